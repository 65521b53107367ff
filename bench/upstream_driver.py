"""Repeat upstream Geneformer's ``InSilicoPerturber`` in ONE process (the ISP benchmark's baseline).

    PYTHONPATH=OVERLAY .venv-helical/bin/python bench/upstream_driver.py PLAN.json

Runs in helical's venv plus the oracle overlay (``tests/oracle_env.py``), not in the project's venv.
PLAN.json: ``{"oracle_dir", "model_dir", "dict_dir", "tokens", "work_dir", "phase_file",
"runs": [{"argv": [...], "output": PATH, "phase": NAME}]}``; ``NAME`` is written to ``phase_file`` before
each run (the benchmark attributes its memory samples to it: :class:`geneformer_triton.bench.proc_memory.TreeMemorySampler`).
Each run is ``run_oracle.main`` of ``ORACLE_DIR/run_oracle.py`` (upstream's unmodified code on CPU; it
times ``perturb_data`` itself and reports ``perturbations_per_s``) with ``--output PATH``; the driver adds
``wall_s`` (the whole call, incl. its JSON writing) to each output. Repeats share the process so that
interpreter and import start-up (~10 s) is paid once; upstream's own timing excludes it anyway.
"""

from __future__ import annotations

import json
import sys
import time


def main(plan_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    sys.path.insert(0, plan["oracle_dir"])
    import run_oracle  # noqa: E402  (imports the CPU shim before upstream)

    dicts = run_oracle.prepare_dicts(plan["dict_dir"], plan["work_dir"])
    for run in plan["runs"]:
        with open(plan["phase_file"], "w") as f:
            f.write(run["phase"])
        started = time.perf_counter()
        run_oracle.main([plan["model_dir"], dicts, plan["tokens"], *run["argv"], "--output", run["output"]])
        wall = time.perf_counter() - started
        with open(run["output"]) as f:
            result = json.load(f)
        result["wall_s"] = wall
        with open(run["output"], "w") as f:
            json.dump(result, f)
        print(f"upstream_driver: {run['output']}: {result['n_perturbations']} perturbations, "
              f"perturb_data {result['seconds']['perturb_data']:.2f} s, wall {wall:.2f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: upstream_driver.py PLAN.json")
    main(sys.argv[1])
