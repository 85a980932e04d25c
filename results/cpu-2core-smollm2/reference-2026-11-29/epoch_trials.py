"""Start the reference study's MRPC epoch trials early (2 epochs at each method's selected rate), in the
folders and with the exact config lorascope.tune's epoch search uses, so the tune stage finds them
finished (same config hash) and only scores them. Run from a clone of main with /work/ref."""
import copy, json, sys
from pathlib import Path
from lorascope.pipeline import load_study, plan
from lorascope.train import train, config_hash

run = Path('/work/ref')
stages = {s.name: s for s in plan(load_study(Path('configs/reference.yaml')), run)}
for method in sys.argv[1:]:
    s = stages[f'tune:mrpc:{method}']
    cfg, grid, out = s.fn.__defaults__
    share = s.config['validation_share']
    best = json.loads((out / 'tune.json').read_text())['best_lr']
    c = copy.deepcopy(cfg)
    c.train.lr = best
    c.data.validation_share = share
    c.train.epochs = 2.0
    c.train.output_dir = str(out / f"lr_{best:.2e}_epochs_2" / "train")
    print(method, best, c.train.output_dir, config_hash(c), flush=True)
    train(c)
