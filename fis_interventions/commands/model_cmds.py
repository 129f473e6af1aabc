"""`fis model info`, `fis harvest`, `fis demo`."""
