"""Test inference: writes its command-line arguments to argv.json, then serves as echo.py."""
import json
import runpy
import sys

with open("argv.json", "w") as fh:
    json.dump(sys.argv[1:], fh)
runpy.run_path("echo.py", run_name="__main__")
