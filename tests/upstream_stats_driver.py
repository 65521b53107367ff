"""Run upstream Geneformer (the oracle) for the stats tests, in ONE helical-venv process (tests only).

    PYTHONPATH=OVERLAY .venv-helical/bin/python tests/upstream_stats_driver.py PLAN.json

PLAN.json: {"model_dir", "dict_dir", "tokens", "root",
            "runs":  [{"name", "argv": [run_oracle.py options]}],
            "stats": [{"name", "mode", "input": RUN, "null": RUN|null, "genes_perturbed": "all"|[ids],
                       "states": {...}|null, "cell_only": bool}]}

Each run is ``../shared/reference/oracle/run_oracle.py`` (upstream's unmodified ``InSilicoPerturber`` and
its own ``InSilicoPerturberStats`` calls) with ``--out-dir ROOT/RUN`` (upstream's raw pickles in
``ROOT/RUN/isp``, its stats CSVs in ``ROOT/RUN/stats``) and ``--output ROOT/RUN.json``. Each stats entry
then calls upstream's ``InSilicoPerturberStats.get_stats`` on a run's pickles (``cell_only``: on a copy
holding only the cell-embedding pickles, which upstream's goal_state_shift needs) and writes
``ROOT/stats/NAME.csv``; an upstream failure is recorded in ``ROOT/stats/NAME.error`` instead.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("GFTRITON_SHARED_DIR", os.path.join(os.path.dirname(HERE), "..", "shared"))
sys.path.insert(0, os.path.join(SHARED, "reference", "oracle"))

import run_oracle  # noqa: E402  (imports the CPU shim before upstream)


def main(plan_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    root = plan["root"]
    os.makedirs(root, exist_ok=True)
    dicts = run_oracle.prepare_dicts(plan["dict_dir"], root)
    for run in plan["runs"]:
        run_oracle.main([plan["model_dir"], dicts, plan["tokens"], *run["argv"],
                         "--out-dir", os.path.join(root, run["name"]), "--output", os.path.join(root, run["name"] + ".json")])

    from geneformer.in_silico_perturber_stats import InSilicoPerturberStats

    stats_dir = os.path.join(root, "stats")
    os.makedirs(stats_dir, exist_ok=True)
    for job in plan.get("stats", []):
        source = os.path.join(root, job["input"], "isp")
        if job.get("cell_only"):
            only = os.path.join(root, job["name"] + "_cell_only")
            os.makedirs(only, exist_ok=True)
            for name in os.listdir(source):
                if "cell_embs" in name:
                    shutil.copy(os.path.join(source, name), only)
            source = only
        null = os.path.join(root, job["null"], "isp") if job.get("null") else None
        try:
            stats = InSilicoPerturberStats(
                mode=job["mode"], genes_perturbed=job.get("genes_perturbed", "all"), combos=0, anchor_gene=None,
                cell_states_to_model=job.get("states"), model_version="V1",
                token_dictionary_file=os.path.join(dicts, "token_dictionary.pkl"),
                gene_name_id_dictionary_file=os.path.join(dicts, "gene_name_id_dict.pkl"))
            stats.get_stats(source, null, stats_dir, job["name"])
        except BaseException:  # upstream raises bare `raise` (RuntimeError) on its own errors
            with open(os.path.join(stats_dir, job["name"] + ".error"), "w") as f:
                f.write(traceback.format_exc())


if __name__ == "__main__":
    main(sys.argv[1])
