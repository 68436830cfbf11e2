import sys
print("model file missing: cannot start", flush=True)
sys.exit(7)
