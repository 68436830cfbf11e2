"""Test inference that runs but never creates its Connector (a model load that hangs)."""
import time

print("loading the model (forever)", flush=True)
time.sleep(3600)
