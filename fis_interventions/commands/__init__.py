"""CLI command groups, one module each; importing a module registers its commands on ``cli.app``.

Each command only parses arguments and calls the Python API function of the same name.
"""

from . import model_cmds  # noqa: F401
from . import stimuli_cmds  # noqa: F401
from . import stats_cmds  # noqa: F401
from . import power_cmds  # noqa: F401
from . import screen_cmds  # noqa: F401
from . import report_cmds  # noqa: F401
from . import battery_cmds  # noqa: F401
from . import train_cmds  # noqa: F401
from . import features_cmds  # noqa: F401
from . import export_cmds  # noqa: F401
