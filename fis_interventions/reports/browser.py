"""Check a report in headless Chromium: it loads without script errors, every image is drawn, and no table
overflows its container at a given window width.

Used by the browser test (and handy by hand). A probe script is injected into a *copy* of the page: it
records uncaught errors and ``console.error`` calls, and on ``load`` draws each image into a canvas and
measures its pixel spread; the results are written into the DOM and read back with ``--dump-dom``
(no DevTools protocol needed). The report itself contains no script.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

PROBE_HEAD = """<script>window.__fisErrors=[];
window.addEventListener('error',function(e){window.__fisErrors.push('error: '+e.message);});
(function(){var o=console.error;console.error=function(){window.__fisErrors.push('console.error: '+
Array.prototype.join.call(arguments,' '));o.apply(console,arguments);};})();</script>"""

PROBE_BODY = """<script>window.addEventListener('load',function(){
var out=[];for(var i=0;i<document.images.length;i++){var im=document.images[i];var r=im.getBoundingClientRect();
var c=document.createElement('canvas');c.width=Math.max(1,Math.min(im.naturalWidth,400));
c.height=Math.max(1,Math.min(im.naturalHeight,400));var std=0;try{var g=c.getContext('2d');
g.drawImage(im,0,0,c.width,c.height);var d=g.getImageData(0,0,c.width,c.height).data;var s=0,s2=0,n=0;
for(var k=0;k<d.length;k+=4){var v=(d[k]+d[k+1]+d[k+2])/3;s+=v;s2+=v*v;n++;}
std=Math.sqrt(Math.max(0,s2/n-(s/n)*(s/n)));}catch(err){window.__fisErrors.push('canvas: '+err);}
out.push({file:im.getAttribute('data-file'),complete:im.complete,naturalWidth:im.naturalWidth,
width:r.width,height:r.height,std:std});}
var tables=[];var ts=document.getElementsByTagName('table');for(var t=0;t<ts.length;t++){var tb=ts[t];
var box=tb.parentElement;var cap=tb.getElementsByTagName('caption');var st=getComputedStyle(box).overflowX;
tables.push({caption:cap.length?cap[0].textContent.slice(0,80):'',width:tb.scrollWidth,
container:box.clientWidth,scrolls:(st=='auto'||st=='scroll'),right:box.getBoundingClientRect().right});}
var page={scrollWidth:document.documentElement.scrollWidth,innerWidth:window.innerWidth};
var pre=document.createElement('pre');pre.id='fis-probe';
pre.textContent=JSON.stringify({images:out,tables:tables,page:page,errors:window.__fisErrors});
document.body.appendChild(pre);document.title='fis-probe-ok';});</script>"""


def chromium_binary() -> str | None:
    """The headless browser to use (Debian's ``chromium``), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("no chromium binary on PATH")
    profile = tempfile.mkdtemp(prefix="fis-chromium-")
    try:
        return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               "--no-first-run", "--allow-file-access-from-files", f"--user-data-dir={profile}",
                               *args], capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def probe_html(html_path: Path, timeout: float = 60.0, width: int = 1280) -> dict[str, Any]:
    """Load a copy of ``html_path`` with the probe in a window ``width`` px wide; returns ``{"title", "images":
    [...], "tables": [{"caption", "width", "container", "scrolls", "right"}], "page": {"scrollWidth",
    "innerWidth"}, "errors": [...]}`` (widths in CSS px, measured after layout)."""
    text = Path(html_path).read_text(encoding="utf-8")
    text = text.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_BODY + "</body>", 1)
    with tempfile.TemporaryDirectory(prefix="fis-probe-") as tmp:
        page = Path(tmp) / "probe.html"
        page.write_text(text, encoding="utf-8")
        proc = _chromium(["--virtual-time-budget=10000", f"--window-size={width},1600", "--hide-scrollbars",
                          "--dump-dom", page.as_uri()], timeout)
    title = re.search(r"<title>(.*?)</title>", proc.stdout, re.S)
    found = re.search(r'<pre id="fis-probe">(.*?)</pre>', proc.stdout, re.S)
    result: dict[str, Any] = {"title": title.group(1) if title else None, "images": [], "tables": [], "errors": [],
                              "returncode": proc.returncode}
    if found:
        import html

        result.update(json.loads(html.unescape(found.group(1))))
    else:
        result["errors"].append(f"probe did not run (chromium rc={proc.returncode}: {proc.stderr[-300:]})")
    return result


def screenshot(html_path: Path, png_path: Path, size: tuple[int, int] = (1200, 2400), timeout: float = 60.0) -> Path:
    """Full-window screenshot of the page (the file is written by Chromium)."""
    _chromium([f"--screenshot={png_path}", f"--window-size={size[0]},{size[1]}", "--hide-scrollbars",
               Path(html_path).resolve().as_uri()], timeout)
    return png_path
