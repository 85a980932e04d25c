"""Tokens/s of each tune trial with the logged SIGSTOP pauses taken out: python speed_without_pauses.py RUN_DIR PAUSES_LOG"""
import json, re, glob, sys, datetime as dt
pauses, cur = [], None
for line in open(sys.argv[2]):
    t, kind = line.split()[:2]
    t = dt.datetime.fromisoformat(t)
    if kind == 'pause': cur = t
    elif cur: pauses.append((cur, t)); cur = None
starts = []
for line in open(sys.argv[1] + '/run.log'):
    m = re.match(r'(\S+ \S+),\d+ INFO lorascope.train: train mrpc/(\w+): 3103 examples', line)
    if m: starts.append((dt.datetime.fromisoformat(m.group(1)), m.group(2)))
for d in sorted(glob.glob(sys.argv[1] + '/tune/mrpc/*/lr_*/')):
    d = d.rstrip('/')
    rows = [json.loads(l) for l in open(d + '/train/metrics.jsonl')]
    last = rows[-1]
    tokens = last['tokens_per_s_this_process'] * last['elapsed_s']
    method = d.split('/')[-2]
    # the trial's own start: the latest 'train mrpc/METHOD' line whose run could have produced it
    done = json.load(open(d + '/train/lorascope-train.json')) if glob.glob(d + '/train/lorascope-train.json') else {}
    # start: the first 'train mrpc/METHOD: 3103 examples' line after which this trial's log began; paused time
    # inside [start, start + elapsed] is taken out
    # the trial's end: when its last metrics row was written; its start: that minus the logged elapsed time
    # (run-config.json's time is not the start when a trial was restarted from scratch with the same config)
    end = dt.datetime.fromtimestamp(__import__('os').path.getmtime(d + '/train/metrics.jsonl'))
    t0 = end - dt.timedelta(seconds=last['elapsed_s'])
    paused = sum(max(0, (min(b, end) - max(a, t0)).total_seconds()) for a, b in pauses)
    if done.get('resumed_from_step'):  # a resumed trial: its process logged only its own steps, unpaused here
        print(d.split('/tune/')[1], 'resumed at step', done['resumed_from_step'], 'tok/s of the resumed process',
              round(done['tokens_per_s'], 1))
        continue
    print(d.split('/tune/')[1], 'start', t0.strftime('%H:%M:%S'), 'paused_s', round(paused),
          'tok/s unpaused', round(tokens / (last['elapsed_s'] - paused), 1), 'steps', last['step'], 'elapsed', round(last['elapsed_s']), 'tokens', round(tokens),
          'tok/s as logged', round(last['tokens_per_s_this_process'], 1), 'resumed', done.get('resumed_from_step'))
print('pauses', [(a.strftime('%H:%M:%S'), b.strftime('%H:%M:%S')) for a, b in pauses])
print('train starts', [(a.strftime('%H:%M:%S'), m) for a, m in starts])
