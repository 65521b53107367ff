"""Every command block of README.md is exercised, so the front door cannot rot.

The README's fenced blocks are parsed into commands (``bash`` blocks: one per line, ``\\`` continuations
joined, comments dropped; ``python`` blocks: the whole block). Each command is mapped, by its exact text,
to one check in ``CHECKS``; a command without a check fails ``test_every_readme_command_has_a_check``, and so
does a check whose command left the README. The checks:

* run the command as written, in a sandbox laid out like a checkout (``model_repository/`` copied without
  weights, ``.venv`` and ``../shared`` linked, ``gftriton`` on PATH), against the real ``tritonserver``
  that the README's own ``gftriton serve`` command starts there; only sizes are cut where a command as
  written runs for minutes (cells, ports; each rewrite is named in ``SMALL``);
* for what cannot run here (Docker, a GPU, ``make test`` itself, a placeholder path): the make recipe
  resolves (``make -n``), the arguments parse with the real ``gftriton`` parser (a misspelled option
  fails), and ``docker-compose.yml`` holds what the command needs (services, build files, the key).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from conftest import REPO_ROOT, SHARED

README = REPO_ROOT / "README.md"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
VENV_BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Command:
    """One README command: the fenced block it is in (0-based), the block's language, its text."""

    block: int
    language: str
    text: str


def _strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` at a word start outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[Command]:
    """The commands of every fenced block of a README (see the module docstring)."""
    commands = []
    for block, match in enumerate(re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, flags=re.M | re.S)):
        language, body = match.group(1).lower(), match.group(2)
        if language not in SHELL_LANGUAGES:
            commands.append(Command(block, language, body.strip()))
            continue
        joined = re.sub(r"\\\n\s*", " ", body)
        for line in joined.splitlines():
            command = " ".join(_strip_comment(line).split())
            if command:
                commands.append(Command(block, language, command))
    return commands


# ----------------------------------------------------------------------------- sandbox


class Sandbox:
    """A checkout-like folder to run README commands in (cwd), and the server they talk to."""

    def __init__(self, root: Path) -> None:
        self.root = root / "checkout"
        shutil.copytree(REPO_ROOT / "model_repository", self.root / "model_repository",
                        ignore=shutil.ignore_patterns("*.onnx", "*.pt", "*.plan", "*.json", "*.bin", "__pycache__"))
        (self.root / ".venv").symlink_to(REPO_ROOT / ".venv")
        (root / "shared").symlink_to(SHARED)
        self.env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
        self.done: dict[str, subprocess.CompletedProcess] = {}
        self.server: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    def run(self, command: str, timeout: float = 600, expect: int | None = 0) -> subprocess.CompletedProcess:
        """Run ``command`` with bash in the sandbox; fail with its output unless it exits ``expect``
        (``None``: any exit code)."""
        result = subprocess.run(["bash", "-c", self.with_ports(command)], cwd=self.root, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if expect is not None and result.returncode != expect:
            pytest.fail(f"`{command}` exited {result.returncode} (expected {expect}):\n"
                        f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
        return result

    def require(self, command: str, small: str | None = None) -> subprocess.CompletedProcess:
        """Run a README command once (as written, or as ``small``) for the commands that need its result."""
        if command not in self.done:
            self.done[command] = self.run(small or command)
        return self.done[command]

    def with_ports(self, command: str) -> str:
        """The README's ports (8000 HTTP, 8001 gRPC, also ``gftriton isp``'s default ``--url``) replaced by
        the sandbox server's free ports."""
        if not self.ports:
            return command
        command = re.sub(r"--http-port 8000\b", f"--http-port {self.ports['http']}", command)
        command = re.sub(r"--grpc-port 8001\b", f"--grpc-port {self.ports['grpc']}", command)
        command = re.sub(r"\blocalhost:8000\b", f"localhost:{self.ports['http']}", command)
        command = re.sub(r"\blocalhost:8001\b", f"localhost:{self.ports['grpc']}", command)
        if re.match(r"(\S*/)?gftriton isp ", command) and "--url" not in command and "--cluster" not in command:
            command += f" --url 127.0.0.1:{self.ports['grpc']}"
        return command

    def serve(self, command: str) -> None:
        """Start the README's ``gftriton serve`` command in the background; wait until it is ready."""
        from geneformer_triton.serving.server import free_port

        self.require(EXPORT)
        self.ports = {"http": free_port(), "grpc": free_port()}
        self.server_log = self.root / "serve.log"
        with self.server_log.open("w") as log:
            self.server = subprocess.Popen(["bash", "-c", "exec " + self.with_ports(command)], cwd=self.root,
                                           env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                pytest.fail(f"`{command}` exited {self.server.returncode}:\n{self.server_log.read_text()[-5000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['http']}/v2/health/ready", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        pytest.fail(f"`{command}` not ready after 180 s:\n{self.server_log.read_text()[-5000:]}")

    def stop(self) -> int | None:
        """SIGTERM the server (as Ctrl-C would) and return its exit code."""
        if self.server is None or self.server.poll() is not None:
            return None if self.server is None else self.server.returncode
        self.server.send_signal(signal.SIGTERM)
        try:
            return self.server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait()
            return -9


@pytest.fixture(scope="module")
def readme_sandbox(tmp_path_factory):
    sandbox = Sandbox(tmp_path_factory.mktemp("readme"))
    yield sandbox
    code = sandbox.stop()
    assert code in (None, 0), f"`{SERVE}` did not stop cleanly on SIGTERM (exit {code}):\n" \
                              f"{sandbox.server_log.read_text()[-3000:]}"


@pytest.fixture
def readme_server(readme_sandbox) -> Sandbox:
    """The sandbox with the README's ``gftriton serve`` running (started once)."""
    if readme_sandbox.server is None:
        readme_sandbox.serve(SERVE)
    assert readme_sandbox.server.poll() is None, f"`{SERVE}` stopped:\n{readme_sandbox.server_log.read_text()[-3000:]}"
    return readme_sandbox


# ----------------------------------------------------------------------------- checks

# README commands other commands depend on
EXPORT = "gftriton export --random-weights --dictionaries ../shared/geneformer/v1"
SERVE = "gftriton serve --repository model_repository --http-port 8000 --grpc-port 8001 --exit-timeout 60"
CELLS_H5AD = (""".venv/bin/python -c "from geneformer_triton.core.data.celltypist_sample import load_celltypist_sample; """
              """load_celltypist_sample(n_cells=8).write_h5ad('cells.h5ad')\"""")
OE_KLF1 = ("gftriton isp --h5ad ../shared/data/perturbench_norman19_k562.h5ad --cells condition=control --max-cells 12 "
           "--perturbation overexpress --targets KLF1 --allow-non-integer --output oe_klf1.parquet")

#: README command -> the command that is run instead (same job, fewer cells / shorter cells)
SMALL = {
    "gftriton fidelity --random-weights --dictionaries ../shared/geneformer/v1 --cells 32":
        "gftriton fidelity --random-weights --dictionaries ../shared/geneformer/v1 --cells 6",
    "gftriton check --url localhost:8001 --cells 16 --random-weights --dictionaries ../shared/geneformer/v1 "
    "--repository model_repository --out results/served":
        "gftriton check --url localhost:8001 --cells 4 --random-weights --dictionaries ../shared/geneformer/v1 "
        "--repository model_repository --out results/served",
    # delete-all of 20 cells of ~1,000 genes is ~20,000 perturbations: 2 real cells cut to 24 genes
    "gftriton isp --n-cells 20 --output isp_delete.parquet":
        "gftriton isp --h5ad short_cells.h5ad --n-cells 2 --output isp_delete.parquet",
    "gftriton evaluate --dataset pbmc68k --url localhost:8001 --repository model_repository --random-weights "
    "--backends onnx,onnx_fp16,torchscript --out results/evaluate":
        "gftriton evaluate --dataset pbmc68k --url localhost:8001 --repository model_repository --random-weights "
        "--backends onnx,onnx_fp16,torchscript --out results/evaluate --max-cells 100",
    "gftriton demo --random-weights --vocabulary-from-sample":
        "gftriton demo --random-weights --vocabulary-from-sample --repository demo_repository --cells 6 "
        "--check-cells 4 --isp-cells 2 --isp-genes 3",
    ".venv/bin/gftriton isp --cluster local:2 --repository model_repository --h5ad cells.h5ad --targets CD74,B2M "
    "--shard-size 2 --output isp_scaleout.parquet":
        ".venv/bin/gftriton isp --cluster local:1 --repository model_repository --h5ad cells.h5ad --targets CD74,B2M "
        "--shard-size 2 --output isp_scaleout.parquet",
}

Check = Callable[..., None]
CHECKS: dict[str, tuple[str, Check]] = {}  # command -> (kind: "e2e" runs it, "parse" does not), check


def check(kind: str, *commands: str) -> Callable[[Check], Check]:
    def register(function: Check) -> Check:
        for command in commands:
            assert command not in CHECKS, f"two checks for {command!r}"
            CHECKS[command] = (kind, function)
        return function

    return register


def gftriton_parses(command: str) -> None:
    """``command``'s arguments parse with the real ``gftriton`` parser, and its subcommand has ``--help``."""
    import contextlib
    import io

    from geneformer_triton.cli import build_parser

    argv = shlex.split(command)
    assert Path(argv[0]).name == "gftriton", command
    parser = build_parser()
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as exit_:
        pytest.fail(f"`{command}` does not parse with gftriton's parser (exit {exit_.code})")
    assert callable(args.func)
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown), pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([argv[1], "--help"])
    assert exit_.value.code == 0 and f"usage: gftriton {argv[1]}" in shown.getvalue()


def make_resolves(target: str, expected: str) -> str:
    """``make -n TARGET`` in the checkout: the recipe resolves and runs ``expected``."""
    result = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout, f"`make -n {target}` does not run {expected!r}:\n{result.stdout}"
    return result.stdout


def _compose() -> dict:
    import yaml

    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


@check("parse", "make demo")
def _make_demo(command: str, request) -> None:
    recipe = make_resolves("demo", "gftriton demo --repository model_repository")
    gftriton_parses(recipe.strip().splitlines()[-1].replace(".venv/bin/gftriton", "gftriton"))
    # what it runs, run small: the README's `gftriton demo` check


@check("parse", "make test")
def _make_test(command: str, request) -> None:
    recipe = make_resolves("test", "GFTRITON_BACKENDS=real")
    assert "-m pytest" in recipe and "build_backends.sh" in recipe and "setup_oracle_env.sh" in recipe


@check("e2e", EXPORT,
       "gftriton export --random-weights --dictionaries ../shared/geneformer/v1 --precision int8",
       "gftriton export --random-weights --dictionaries ../shared/geneformer/v1 --save-checkpoint gf_ckpt")
def _export(command: str, sandbox: Sandbox) -> None:
    result = sandbox.require(command)
    assert "RANDOM" in result.stderr
    repository = sandbox.root / "model_repository"
    assert (repository / "geneformer_onnx_int8" / "1" / "model.onnx").is_file()
    assert (repository / "geneformer_tokenizer" / "1" / "token_dictionary.json").is_file()
    if "--save-checkpoint" in command:
        assert (sandbox.root / "gf_ckpt" / "config.json").is_file()
    elif "--precision" not in command:
        assert (repository / "geneformer_torchscript" / "1" / "model.pt").is_file()


@check("parse", "gftriton export --model /path/to/gf-12L-38M-i4096")
def _export_checkpoint(command: str, request) -> None:
    gftriton_parses(command)  # a placeholder path: the export of another model size has its own test


@check("e2e", "gftriton export-tensorrt --precision fp16")
def _export_tensorrt(command: str, sandbox: Sandbox) -> None:
    sandbox.require(EXPORT)
    result = sandbox.run(command, expect=2)  # no GPU / TensorRT here: it says what is missing
    assert re.search(r"TensorRT|GPU", result.stderr), result.stderr[-2000:]


@check("e2e", "gftriton fidelity --random-weights --dictionaries ../shared/geneformer/v1 --cells 32")
def _fidelity(command: str, sandbox: Sandbox) -> None:
    sandbox.require(EXPORT)
    import pandas as pd

    result = sandbox.run(SMALL[command], expect=None)
    table = pd.read_csv(sandbox.root / "results" / "fidelity" / "fidelity.csv")
    failed = {variant.split()[0] for variant in table.loc[~table["passed"].astype(bool), "variant"]}
    assert result.returncode == 0 and not failed, result.stdout[-3000:] + result.stderr[-3000:]


@check("e2e", SERVE)
def _serve(command: str, server: Sandbox) -> None:
    url = f"http://127.0.0.1:{server.ports['http']}/v2/models/geneformer_embed_onnx/ready"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200  # the stop on SIGTERM is checked when the sandbox closes


@check("e2e", "gftriton embed cells.h5ad -o cells_gf.h5ad --url localhost:8001 --protocol grpc "
              "--model geneformer_embed_onnx --repository model_repository --batch-size 32 --concurrency 2")
def _embed_h5ad(command: str, server: Sandbox) -> None:
    import anndata

    server.require(CELLS_H5AD)
    server.run(command)
    embedded = anndata.read_h5ad(server.root / "cells_gf.h5ad")
    assert embedded.obsm["X_geneformer"].shape == (8, 256)


@check("e2e", "gftriton embed sample_cell_by_gene.csv -o emb.parquet --url localhost:8000 --protocol http "
              "--client-tokenize --encoder geneformer_onnx --repository model_repository --max-cells 500")
def _embed_csv(command: str, server: Sandbox) -> None:
    import pandas as pd

    from geneformer_triton.core.data.celltypist_sample import fetch_celltypist_files

    sample, _ = fetch_celltypist_files()
    with sample.open() as source:  # the celltypist sample's CSV, its first 6 cells
        (server.root / "sample_cell_by_gene.csv").write_text("".join(next(source) for _ in range(7)))
    server.run(command)  # symbols mapped with the exported V1 gene_name_id_dict.json
    assert len(pd.read_parquet(server.root / "emb.parquet")) == 6


@check("e2e", "gftriton check --url localhost:8001 --cells 16 --random-weights --dictionaries ../shared/geneformer/v1 "
              "--repository model_repository --out results/served")
def _check_served(command: str, server: Sandbox) -> None:
    server.run(SMALL[command])  # exit 0: every served backend holds its gate
    assert list((server.root / "results" / "served").glob("*.csv"))


def _isp_outputs(sandbox: Sandbox, output: str) -> None:
    import pandas as pd

    rows = pd.read_parquet(sandbox.root / output)
    assert len(rows) and rows["cell_emb_shift"].notna().all()
    stem = output.removesuffix(".parquet")
    assert (sandbox.root / f"{stem}_summary.csv").is_file() and (sandbox.root / f"{stem}_top_shifts.png").is_file()


@check("e2e", "gftriton isp --n-cells 20 --output isp_delete.parquet")
def _isp_delete_all(command: str, server: Sandbox) -> None:
    import numpy as np

    from geneformer_triton.core.data.celltypist_sample import load_celltypist_sample

    cells = load_celltypist_sample(n_cells=2)
    keep = np.unique(np.concatenate([np.argsort(-cells.X[row].toarray().ravel())[:24] for row in range(2)]))
    cells[:, keep].copy().write_h5ad(server.root / "short_cells.h5ad")  # obs n_counts: the whole cells' totals
    server.run(SMALL[command])
    _isp_outputs(server, "isp_delete.parquet")


@check("e2e", "gftriton isp --h5ad cells.h5ad --perturbation overexpress --targets GATA1,SPI1 --emb-mode cell_and_gene "
              "--output oe.parquet", OE_KLF1)
def _isp_overexpress(command: str, server: Sandbox) -> None:
    server.require(CELLS_H5AD)
    server.require(command)
    _isp_outputs(server, shlex.split(command)[-1])


@check("e2e", "gftriton isp-stats --mode aggregate_data --input oe_klf1.parquet --dictionaries ../shared/geneformer/v1 "
              "--genes-perturbed ENSG00000105610 --output oe_klf1_stats.csv")
def _isp_stats(command: str, server: Sandbox) -> None:
    import pandas as pd

    server.require(OE_KLF1)
    server.run(command)
    assert len(pd.read_csv(server.root / "oe_klf1_stats.csv"))


@check("e2e", "gftriton evaluate --dataset pbmc68k --url localhost:8001 --repository model_repository --random-weights "
              "--backends onnx,onnx_fp16,torchscript --out results/evaluate")
def _evaluate(command: str, server: Sandbox) -> None:
    server.run(SMALL[command])
    assert (server.root / "results" / "evaluate").is_dir()


@check("parse", "gftriton bench --mode quick", "gftriton bench --mode full")
def _bench(command: str, request) -> None:
    gftriton_parses(command)
    if command.endswith("quick"):  # run end to end by tests/test_bench.py (quick_results)
        assert "main([\"--mode\", \"quick\"" in (REPO_ROOT / "tests" / "test_bench.py").read_text()


@check("e2e", "gftriton demo --random-weights --vocabulary-from-sample")
def _demo(command: str, sandbox: Sandbox) -> None:
    shutil.copytree(REPO_ROOT / "model_repository", sandbox.root / "demo_repository",
                    ignore=shutil.ignore_patterns("*.onnx", "*.pt", "*.plan", "*.json", "__pycache__"))
    result = sandbox.run(SMALL[command])
    assert "Most shifted genes" in result.stdout and "Fidelity of every served backend" in result.stdout
    summary = json.loads((sandbox.root / "results" / "demo" / "summary.json").read_text())
    assert summary["fidelity_passed"] and summary["isp"]["perturbations"] == 2 * 3


@check("e2e", CELLS_H5AD)
def _cells_h5ad(command: str, sandbox: Sandbox) -> None:
    import anndata

    sandbox.require(command)
    assert anndata.read_h5ad(sandbox.root / "cells.h5ad").n_obs == 8


@check("e2e", ".venv/bin/gftriton isp --cluster local:2 --repository model_repository --h5ad cells.h5ad "
              "--targets CD74,B2M --shard-size 2 --output isp_scaleout.parquet")
def _scale_out(command: str, sandbox: Sandbox) -> None:
    sandbox.require(EXPORT)
    sandbox.require(CELLS_H5AD)
    sandbox.run(SMALL[command])
    _isp_outputs(sandbox, "isp_scaleout.parquet")


@check("e2e", 'echo "TRITON_ADMIN_KEY=$(openssl rand -hex 16)" >> .env')
def _env_key(command: str, sandbox: Sandbox) -> None:
    sandbox.run(command)
    assert re.fullmatch(r"TRITON_ADMIN_KEY=[0-9a-f]{32}\n", (sandbox.root / ".env").read_text())
    server = _compose()["services"]["tritonserver"]
    assert any("${TRITON_ADMIN_KEY:?" in str(arg) for arg in server["command"]), "compose must require the key"


@check("parse", "docker compose up -d --build")
def _compose_up(command: str, request) -> None:
    services = _compose()["services"]
    built = {name: service["build"] for name, service in services.items() if "build" in service}
    assert built, "`--build` needs a service with a build section"
    for name, build in built.items():
        context = REPO_ROOT / build.get("context", ".")
        assert context.is_dir() and (context / build.get("dockerfile", "Dockerfile")).is_file(), name
    assert "tritonserver" in services and any("8000" in str(port) for port in services["tritonserver"]["ports"])


@check("e2e", "curl -fsS localhost:8000/v2/health/ready")
def _curl_ready(command: str, server: Sandbox) -> None:
    server.run(command)


@check("parse", "docker compose run --rm sdk")
def _compose_sdk(command: str, request) -> None:
    sdk = _compose()["services"]["sdk"]
    assert "perf_analyzer" in json.dumps(sdk), "the sdk service runs perf_analyzer"


PYTHON_API = next((c.text for c in readme_commands(README.read_text()) if c.language == "python"), "")


@check("e2e", PYTHON_API)
def _python_api(command: str, server: Sandbox) -> None:
    server.require(CELLS_H5AD)
    script = server.with_ports(command) + "\nassert emb.shape == (8, 256), emb.shape\nprint('OK')\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=server.root, env=server.env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


# ----------------------------------------------------------------------------- tests

COMMANDS = readme_commands(README.read_text())


def test_every_readme_command_has_a_check():
    unmapped = [c.text for c in COMMANDS if c.text not in CHECKS]
    assert not unmapped, f"README commands without a check in tests/test_readme.py (add one to CHECKS): {unmapped}"
    stale = sorted(set(CHECKS) - {c.text for c in COMMANDS})
    assert not stale, f"checks for commands no longer in README.md (update or remove them): {stale}"
    assert set(SMALL) <= set(CHECKS), "every SMALL rewrite belongs to a README command"


def test_a_new_readme_block_without_a_check_is_caught():
    """Negative control: a block added to the README makes the mapping incomplete."""
    extra = README.read_text() + "\n```bash\ngftriton serve --repository elsewhere\n```\n"
    commands = readme_commands(extra)
    assert [c.text for c in commands if c.text not in CHECKS] == ["gftriton serve --repository elsewhere"]
    assert len(commands) == len(COMMANDS) + 1


def test_parser_joins_continuations_and_drops_comments():
    text = "```bash\n# a note\ngftriton isp --a 1 \\\n   --b 'x # y'  # why\n```\n```python\nprint(1)\n```\n"
    assert readme_commands(text) == [Command(0, "bash", "gftriton isp --a 1 --b 'x # y'"), Command(1, "python", "print(1)")]


def test_a_misspelled_option_fails_the_parse_check():
    """Negative control for the checks that only parse: a wrong option is caught."""
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        gftriton_parses("gftriton bench --mode quick --no-such-option")
    with pytest.raises(AssertionError):
        make_resolves("no-such-target", "anything")


def _param(command: Command):
    kind, _ = CHECKS.get(command.text, ("parse", None))
    marks = [pytest.mark.e2e] if kind == "e2e" else []
    return pytest.param(command, marks=marks, id=f"block{command.block}:{command.text[:60]}")


@pytest.mark.parametrize("command", [_param(c) for c in COMMANDS])
def test_readme_command(command: Command, request):
    if command.text not in CHECKS:
        pytest.fail(f"no check for README command {command.text!r} (see test_every_readme_command_has_a_check)")
    kind, function = CHECKS[command.text]
    if kind == "parse":
        function(command.text, request)
        return
    needs_server = "server" in function.__code__.co_varnames[:function.__code__.co_argcount]
    function(command.text, request.getfixturevalue("readme_server" if needs_server else "readme_sandbox"))
