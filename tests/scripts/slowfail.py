import sys
import time

time.sleep(2)
print("gave up loading the model", flush=True)
sys.exit(5)
