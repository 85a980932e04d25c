import os, sys, logging
os.environ["LORASCOPE_DATA_DIR"] = "/work/shared/data"
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
from lorascope.pipeline import load_study
from lorascope.tune import tune_lr
from pathlib import Path
st = load_study(Path("mrpc-q.yaml"))
cfg = st.task_config("mrpc")
cfg.train.method = "lora"
cfg.train.seed = 0
print(tune_lr(cfg, [float(x) for x in sys.argv[1].split(",")], 0.25, Path(sys.argv[2]))["trials"])
