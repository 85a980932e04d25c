"""The MRPC search's trials with the report's intervals, from the records in this folder (tune/).

    python search_intervals.py     (from this folder, with lorascope installed)

Prints each trial's validation accuracy with its 95 % bootstrap interval over the 565 validation
pairs, and each selection against its runner-up, paired: what `lorascope report` shows in its
learning-rate section (lorascope.report.render._lr_section), rendered here for this folder.
"""

from pathlib import Path

from lorascope.report.render import Doc, _lr_section

doc = Doc()
_lr_section(doc, Path(__file__).resolve().parent, ["mrpc"])
for block in doc.blocks:
    if block[0] == "table":
        print(" | ".join(block[1]))
        for row in block[2]:
            print(" | ".join(row))
    elif block[0] == "p":
        print("\n" + block[1])
