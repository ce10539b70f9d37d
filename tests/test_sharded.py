"""A model bigger than one Mac, sharded over nodes (issue 14), on paper: routes.yaml shapes
that `maclustr check` accepts or refuses (file:line), the MLX hostfile, rank 0's plist, the
`make deploy` plan (dry run and recorded), and what the public sees (deep health, front
page). The group really running is tests/test_sharded_real.py."""

from __future__ import annotations

import json
import plistlib
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeMLX, dedent
from test_deploy import Cluster, launchctl

from maclustr.cli import main as cli_main
from maclustr.harness import require_module

ROOT = Path(__file__).resolve().parent.parent
GIANT = "io.maclustr.mlx.maclustr-giant"

# Three 96 GB Studios: coder alone on studio-3; a 235B MoE at 4 bits (~124 GB of weights)
# sharded over studio-1 (rank 0, also the gateway) and studio-2 over a Thunderbolt bridge.
THREE = textwrap.dedent("""\
    nodes:
      studio-1:
        ssh: admin@studio-1.local
        gateway: true
        ips: [192.168.77.1]
        memory_gb: 96
      studio-2:
        ssh: admin@studio-2.local
        ips: [192.168.77.2]
        memory_gb: 96
      studio-3:
        ssh: admin@studio-3.local
        memory_gb: 96
    models:
      maclustr-coder:
        model: mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit
        upstream: http://studio-3.local:8081
      maclustr-giant:
        model: mlx-community/Qwen3-235B-A22B-Instruct-2507-4bit
        upstream: http://studio-1.local:8085
        shards: [studio-1, studio-2]
        size_gb: 124
        description: Largest model
        parameters: 235B (MoE)
    """)
GIANT_LINE = THREE.splitlines().index("  maclustr-giant:") + 1
ALIAS_LINE = "  maclustr-giant:"


def line_of(text: str, marker: str) -> int:
    """1-based number of the first line of `text` containing `marker`."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if marker in line)


def run(tmp_path: Path, text: str, *argv: str,
        capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    p = tmp_path / "routes.yaml"
    p.write_text(text)
    code = cli_main([*argv, "--routes", str(p)])
    out = capsys.readouterr()
    return code, out.out, out.err.replace(str(p), "routes.yaml")


# --- maclustr check ------------------------------------------------------------------------


def test_check_accepts_the_group_and_shows_every_rank(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(tmp_path, THREE, "check", capsys=capsys)
    assert code == 0, err
    assert err == ""  # 124 GB + KV does not fit one 96 GB node: no warning either
    assert "node studio-1 (admin@studio-1.local): gateway :9000, maclustr-giant :8085 " \
           "(rank 0 of 2)" in out
    assert "node studio-2 (admin@studio-2.local): maclustr-giant (rank 1 of 2)" in out
    assert "node studio-3 (admin@studio-3.local): maclustr-coder :8081" in out


def _edit(old: str, new: str) -> str:
    assert old in THREE, old
    return THREE.replace(old, new)


@pytest.mark.parametrize(("text", "line", "message"), [
    (_edit("shards: [studio-1, studio-2]", "shards: [studio-1]"), "shards:",
     "models.maclustr-giant.shards must list at least two nodes"),
    (_edit("shards: [studio-1, studio-2]", "shards: [studio-1, studio-9]"), "shards:",
     "models.maclustr-giant.shards: unknown node 'studio-9'"),
    (_edit("shards: [studio-1, studio-2]", "shards: [studio-1, studio-1]"), "shards:",
     "models.maclustr-giant.shards lists node 'studio-1' twice"),
    (_edit("    size_gb: 124\n", "    size_gb: 124\n    backend: nccl\n"), "backend:",
     "models.maclustr-giant.backend must be one of ring, jaccl, got 'nccl'"),
    (_edit("    size_gb: 124\n", "    size_gb: 124\n    node: studio-1\n"), "shards:",
     "a sharded model is one group behind one 'upstream'"),
    (_edit("    upstream: http://studio-3.local:8081\n",
           "    upstream: http://studio-3.local:8081\n    pipeline: true\n"), "pipeline:",
     "models.maclustr-coder.pipeline applies to a sharded model only"),
    # rank 0 must be the first shard node: the upstream points at studio-2
    (_edit("http://studio-1.local:8085", "http://studio-2.local:8085"), ALIAS_LINE,
     "rank 0 runs on the first shard node 'studio-1', but upstream host 'studio-2.local'"),
    # the group's port is taken on rank 1's node
    (_edit("http://studio-3.local:8081", "http://studio-2.local:8085"), ALIAS_LINE,
     "models.maclustr-giant: port 8085 on node 'studio-2' is already used by "
     "models.maclustr-coder"),
    # the ring's port on rank 1's node (32323 + 1) is taken
    (_edit("http://studio-3.local:8081", "http://studio-2.local:32324"), ALIAS_LINE,
     "models.maclustr-giant: ring port 32324 on node 'studio-2' is already used by "
     "models.maclustr-coder"),
    (_edit("    memory_gb: 96\n  studio-3", "    memory_gb: 96\n    venv: /opt/mlx\n  studio-3"),
     ALIAS_LINE, "the shard nodes need the same venv path"),
    (_edit("size_gb: 124", "size_gb: 150"), ALIAS_LINE,
     "models.maclustr-giant: does not fit on its 2 shards: each needs 82.5 GB (150 GB "
     "weights + 15 GB KV cache over 2 nodes) but studio-1 offers 72.0 GB (75% of 96), "
     "studio-2 offers 72.0 GB (75% of 96)"),
    (_edit("    ssh: admin@studio-2.local\n    ips: [192.168.77.2]\n    memory_gb: 96\n",
           "    ssh: admin@studio-2.local\n    ips: [192.168.77.2]\n"), ALIAS_LINE,
     "models.maclustr-giant: size_gb is set but studio-2 has no memory_gb"),
    (_edit("    size_gb: 124\n", "    size_gb: 124\n    backend: jaccl\n"), ALIAS_LINE,
     "backend jaccl needs nodes.studio-1.rdma.studio-2"),
])
def test_check_refuses_a_group_that_cannot_run_naming_file_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: str,
        message: str) -> None:
    code, out, err = run(tmp_path, text, "check", capsys=capsys)
    assert code == 1, out
    assert message in err, err
    assert f"routes.yaml:{line_of(text, line)}: " in err, err
    assert out == ""  # no table printed for a refused file


def test_shards_without_a_nodes_section_are_refused(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    text = "models:\n" + THREE.split("models:\n", 1)[1]
    code, _, err = run(tmp_path, text, "check", capsys=capsys)
    assert code == 1
    assert (f"routes.yaml:{line_of(text, 'shards:')}: models.maclustr-giant.shards names "
            "nodes, but there is no 'nodes:' section") in err, err


def test_check_says_when_a_one_node_model_needs_shards(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    text = _edit("    upstream: http://studio-3.local:8081\n",
                 "    upstream: http://studio-3.local:8081\n    size_gb: 80\n")
    code, out, err = run(tmp_path, text, "check", capsys=capsys)
    assert code == 1 and out == ""
    assert (f"routes.yaml:{line_of(text, 'maclustr-coder:')}: node studio-3 cannot hold what it "
            "runs: maclustr-coder 88.0 GB = 88.0 GB but studio-3 offers 72.0 GB (75% of 96) "
            "(weights + KV cache); shard it over several nodes") in err, err
    code, out, err = run(tmp_path, text.replace("size_gb: 80", "size_gb: 17"), "check",
                         capsys=capsys)
    assert code == 0 and err == "", err


def test_check_adds_up_everything_a_node_runs(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Rank 0's share of the group (68.2 GB) and a one-node model on studio-1 (18.7 GB)."""
    text = _edit("    upstream: http://studio-3.local:8081\n",
                 "    upstream: http://studio-1.local:8081\n    size_gb: 17\n")
    code, _, err = run(tmp_path, text, "check", capsys=capsys)
    assert code == 1
    assert ("node studio-1 cannot hold what it runs: maclustr-coder 18.7 GB + maclustr-giant "
            "68.2 GB = 86.9 GB but studio-1 offers 72.0 GB (75% of 96); move a model to "
            "another node") in err, err
    assert "studio-2" not in err  # rank 1's node holds only its share


def test_check_warns_when_the_model_would_fit_on_one_node_anyway(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(tmp_path, _edit("size_gb: 124", "size_gb: 40"), "check",
                         capsys=capsys)
    assert code == 0 and "OK, 2 models" in out
    assert (f"routes.yaml:{GIANT_LINE}: warning: models.maclustr-giant: would fit on one node "
            "anyway (44.0 GB with KV cache <= 72.0 GB on studio-1)") in err


def test_a_kv_allowance_and_a_raised_gpu_limit_can_be_given(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = _edit("size_gb: 124", "size_gb: 124\n    kv_gb: 30")
    code, _, err = run(tmp_path, text, "check", capsys=capsys)
    assert code == 1 and "each needs 77.0 GB (124 GB weights + 30 GB KV cache" in err
    # after `sudo sysctl iogpu.wired_limit_mb=...` on both nodes
    raised = text.replace("ips: [192.168.77.1]\n", "ips: [192.168.77.1]\n    gpu_limit_gb: 84\n")
    code, _, err = run(tmp_path, raised, "check", capsys=capsys)
    assert code == 1 and "but studio-2 offers 72.0 GB (75% of 96)" in err
    assert "studio-1 offers" not in err
    raised = raised.replace("ips: [192.168.77.2]\n", "ips: [192.168.77.2]\n    gpu_limit_gb: 84\n")
    code, out, err = run(tmp_path, raised, "check", capsys=capsys)
    assert code == 0 and err == "" and "OK, 2 models" in out, err


def test_the_readme_example_is_what_check_says(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    section = (ROOT / "docs" / "sharding.md").read_text()
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    code, _, err = run(tmp_path, example, "check", capsys=capsys)
    assert code == 1 and "each needs 72.6 GB (132 GB weights + 13.2 GB KV cache" in err, err
    assert "72.6 GB > 72 GB" in section
    raised = example.replace("memory_gb: 96", "memory_gb: 96, gpu_limit_gb: 84")
    code, out, err = run(tmp_path, raised, "check", capsys=capsys)
    assert code == 0 and "OK, 1 models" in out, err


# --- maclustr hostfile ---------------------------------------------------------------------


def test_hostfile_lists_every_rank_rank_0_first_with_its_ring_addresses(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = _edit("shards: [studio-1, studio-2]", "shards: [studio-1, studio-2, studio-3]")
    code, out, err = run(tmp_path, text, "hostfile", "--model", "maclustr-giant",
                         capsys=capsys)
    assert code == 0, err
    # rank 0 runs where launchd starts mlx.launch: "127.0.0.1" is how mlx.launch is told
    # to start a rank without ssh; studio-3 has no ips: so its host is used
    assert json.loads(out) == [
        {"ssh": "127.0.0.1", "ips": ["192.168.77.1"]},
        {"ssh": "admin@studio-2.local", "ips": ["192.168.77.2"]},
        {"ssh": "admin@studio-3.local", "ips": ["studio-3.local"]},
    ]


def test_hostfile_for_jaccl_names_the_rdma_device_towards_every_peer(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = _edit("    memory_gb: 96\n  studio-2:",
                 "    memory_gb: 96\n    rdma: {studio-2: rdma_en3}\n  studio-2:")
    text = text.replace("    ips: [192.168.77.2]\n",
                        "    ips: [192.168.77.2]\n    rdma: {studio-1: rdma_en5}\n")
    text = text.replace("    size_gb: 124\n", "    size_gb: 124\n    backend: jaccl\n")
    code, out, err = run(tmp_path, text, "hostfile", "--model", "maclustr-giant",
                         capsys=capsys)
    assert code == 0, err
    assert json.loads(out) == [
        {"ssh": "127.0.0.1", "ips": ["192.168.77.1"], "rdma": [None, "rdma_en3"]},
        {"ssh": "admin@studio-2.local", "ips": ["192.168.77.2"], "rdma": ["rdma_en5", None]},
    ]


def test_the_hostfile_is_one_mlx_launch_reads(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Parsed by the installed mlx package's own hostfile reader."""
    common = require_module("mlx._distributed_utils.common", "mlx")
    _, out, _ = run(tmp_path, THREE, "hostfile", "--model", "maclustr-giant", capsys=capsys)
    f = tmp_path / "hosts.json"
    f.write_text(out)
    hosts = common.Hostfile.from_file(str(f)).hosts
    assert [(h.rank, h.ssh_hostname, h.ips) for h in hosts] == [
        (0, "127.0.0.1", ["192.168.77.1"]), (1, "admin@studio-2.local", ["192.168.77.2"])]


@pytest.mark.parametrize(("alias", "message"), [
    ("maclustr-coder", "models.maclustr-coder is not sharded"),
    ("maclustr-nope", "unknown model 'maclustr-nope'"),
])
def test_hostfile_refuses_a_model_without_shards(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], alias: str, message: str) -> None:
    code, out, err = run(tmp_path, THREE, "hostfile", "--model", alias, capsys=capsys)
    assert code == 1 and out == "" and message in err


# --- rank 0's plist ------------------------------------------------------------------------


def plists(tmp_path: Path, text: str, node: str) -> dict[str, dict[str, Any]]:
    routes = tmp_path / "routes.yaml"
    routes.write_text(text)
    out = tmp_path / f"agents-{node}"
    r = subprocess.run([sys.executable, "-m", "maclustr", "plists", "--node", node, "--out",
                        str(out), "--routes", str(routes)], cwd=ROOT, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return {f.name: plistlib.loads(f.read_bytes()) for f in sorted(out.iterdir())}


def test_only_rank_0_gets_a_job_and_it_runs_mlx_launch(tmp_path: Path) -> None:
    one = plists(tmp_path, THREE, "studio-1")
    assert sorted(one) == ["io.maclustr.gateway.plist", f"{GIANT}.plist"]
    job = one[f"{GIANT}.plist"]
    venv = "/Users/admin/maclustr/venv"
    assert job["ProgramArguments"] == [
        f"{venv}/bin/mlx.launch", "--hostfile", f"/Users/admin/maclustr/hosts/{GIANT}.json",
        "--backend", "ring", "--starting-port", "32323",
        "--env=PYTHONUNBUFFERED=1", "--env=HF_HUB_OFFLINE=1",
        "--", f"{venv}/bin/mlx_lm.server",
        "--model", "mlx-community/Qwen3-235B-A22B-Instruct-2507-4bit",
        "--host", "studio-1.local", "--port", "8085"]
    # mlx.launch exits 0 when a rank dies (tests/test_sharded_real.py): restart regardless
    assert job["KeepAlive"] is True and job["RunAtLoad"] is True
    assert plists(tmp_path, THREE, "studio-2") == {}  # mlx.launch starts rank 1 over ssh
    assert list(plists(tmp_path, THREE, "studio-3")) == ["io.maclustr.mlx.maclustr-coder.plist"]


def test_pipeline_backend_and_mlx_args_reach_the_command(tmp_path: Path) -> None:
    text = _edit("    size_gb: 124\n", "    size_gb: 124\n    backend: jaccl\n    pipeline: true\n"
                 "    ring_port: 40000\n    mlx_args: [--prompt-cache-size, '4']\n")
    text = text.replace("    memory_gb: 96\n  studio-2:",
                        "    memory_gb: 96\n    rdma: {studio-2: rdma_en3}\n  studio-2:")
    text = text.replace("    ips: [192.168.77.2]\n",
                        "    ips: [192.168.77.2]\n    rdma: {studio-1: rdma_en3}\n")
    args = plists(tmp_path, text, "studio-1")[f"{GIANT}.plist"]["ProgramArguments"]
    assert args[3:7] == ["--backend", "jaccl", "--starting-port", "40000"]
    assert args[-4:] == ["8085", "--pipeline", "--prompt-cache-size", "4"]


# --- make deploy ---------------------------------------------------------------------------


def test_dry_run_shows_the_hostfile_and_rank_0_job_and_runs_nothing(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    out, calls = c.make(THREE, "DRY_RUN=1")
    assert calls == []
    printed = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
    assert any(line.startswith("maclustr hostfile ") and "--model maclustr-giant" in line
               for line in printed)
    assert any(line.startswith(f"{c.rsync} ") and
               "admin@studio-1.local:/Users/admin/maclustr/hosts/" in line for line in printed)
    boot = f"launchctl bootstrap gui/$(id -u) ~/Library/LaunchAgents/{GIANT}.plist"
    assert [line.split()[1] for line in printed if boot in line] == ["admin@studio-1.local"]
    assert any("curl" in line and "http://studio-1.local:8085/health" in line
               for line in printed)
    assert "would change 3 service(s)" in out  # gateway, coder, giant


def test_recorded_deploy_ships_the_hostfile_and_restarts_the_group_when_it_changes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = Cluster(tmp_path)
    _, calls = c.make(THREE)
    assert c.agents("studio-1") == ["io.maclustr.gateway.plist", f"{GIANT}.plist"]
    assert c.agents("studio-2") == []
    shipped = c.remote / f"admin@studio-1.local/Users/admin/maclustr/hosts/{GIANT}.json"
    cli_dir = tmp_path / "cli"
    cli_dir.mkdir()
    _, printed, _ = run(cli_dir, THREE, "hostfile", "--model", "maclustr-giant", capsys=capsys)
    assert json.loads(shipped.read_text()) == json.loads(printed)
    actions = launchctl(calls)
    assert actions.index(("studio-1", f"bootstrap {GIANT}")) < actions.index(
        ("studio-1", "bootstrap io.maclustr.gateway"))
    _, calls = c.make(THREE)
    assert launchctl(calls) == []  # nothing changed, nothing restarted
    # a new Thunderbolt address changes only the hostfile: the group restarts with it
    moved = THREE.replace("ips: [192.168.77.2]", "ips: [192.168.78.2]")
    _, calls = c.make(moved)
    assert launchctl(calls) == [("studio-1", f"bootout {GIANT}"),
                                ("studio-1", f"bootstrap {GIANT}"),
                                ("studio-1", "kill io.maclustr.gateway")]
    assert "192.168.78.2" in shipped.read_text()


def test_rehoming_a_group_starts_the_new_rank_0_before_stopping_the_old(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    c.make(THREE)
    # rank 0 moves from studio-1 to studio-3 (studio-2 stays rank 1)
    moved = THREE.replace("upstream: http://studio-1.local:8085",
                          "upstream: http://studio-3.local:8085").replace(
        "shards: [studio-1, studio-2]", "shards: [studio-3, studio-2]")
    dry, none = c.make(moved, "DRY_RUN=1")
    assert none == []
    _, calls = c.make(moved)
    actions = launchctl(calls)
    new = actions.index(("studio-3", f"bootstrap {GIANT}"))
    reload_ = actions.index(("studio-1", "kill io.maclustr.gateway"))
    old = actions.index(("studio-1", f"bootout {GIANT}"))
    assert new < reload_ < old
    cmds = [x.get("command") or " ".join(x["argv"]) for x in calls]
    healthy = next(i for i, s in enumerate(cmds) if "http://studio-3.local:8085/health" in s)
    hup = next(i for i, s in enumerate(cmds) if "kill HUP" in s)
    assert healthy < hup
    assert c.agents("studio-3") == ["io.maclustr.mlx.maclustr-coder.plist", f"{GIANT}.plist"]
    assert c.agents("studio-1") == ["io.maclustr.gateway.plist"]
    dry_calls = [shlex.split(line[2:]) for line in dry.splitlines()
                 if line.startswith(f"+ {c.ssh} ")]
    assert launchctl([{"tool": "ssh", "target": a[1], "command": a[2]}
                      for a in dry_calls]) == actions


# --- what the public sees ------------------------------------------------------------------


def sharded_routes(url: str) -> str:
    port = url.rsplit(":", 1)[1]
    return dedent(f"""
        nodes:
          studio-1: {{ssh: admin@studio-1.local, host: 127.0.0.1}}
          studio-2: {{ssh: admin@studio-2.local}}
        models:
          maclustr-giant:
            model: /Users/admin/models/internal-giant-id
            upstream: http://127.0.0.1:{port}
            shards: [studio-1, studio-2]
            description: Largest model
            parameters: 235B
          maclustr-fast:
            model: /Users/admin/models/internal-fast-id
            upstream: {url}
            description: Fast model
            parameters: 1B
        """)


async def test_deep_health_and_front_page_say_sharded_over_n_nodes_and_nothing_more(
        make_gateway: Any, fake: FakeMLX) -> None:
    gw = await make_gateway(sharded_routes(fake.url))
    gw.secrets |= {"studio-1", "studio-2", "admin@"}
    ans = await gw.client.get("/health?deep=true", auth=False)
    assert ans.status == 200
    models = ans.json()["models"]
    assert models["maclustr-giant"]["status"] == "up"
    assert models["maclustr-giant"]["placement"] == "sharded over 2 nodes"
    assert "placement" not in models["maclustr-fast"]
    schema = (await gw.client.get("/openapi.json", auth=False)).json()
    health = schema["components"]["schemas"]["Health"]["properties"]["models"]["anyOf"][1]
    assert "sharded over N nodes" in health["additionalProperties"]["properties"]["placement"][
        "description"]
    page = await gw.client.get("/", auth=False)
    text = page.body.decode()
    assert text.count("sharded over 2 nodes") == 1
    assert 'data-alias="maclustr-giant"' in text
    row = text.split('data-alias="maclustr-giant"', 1)[1].split("</tr>", 1)[0]
    assert "sharded over 2 nodes" in row


async def test_a_dead_group_reports_down_with_its_placement(make_gateway: Any,
                                                            fake: FakeMLX) -> None:
    gw = await make_gateway(sharded_routes(fake.url).replace(
        f"http://127.0.0.1:{fake.url.rsplit(':', 1)[1]}\n    shards",
        "http://127.0.0.1:9\n    shards"))
    gw.secrets |= {"studio-1", "studio-2", "127.0.0.1:9"}
    ans = await gw.client.get("/health?deep=true", auth=False)
    assert ans.status == 503
    giant = ans.json()["models"]["maclustr-giant"]
    assert giant["status"] == "down" and giant["placement"] == "sharded over 2 nodes"
    chat = await gw.client.post("/v1/chat/completions", {
        "model": "maclustr-giant", "messages": [{"role": "user", "content": "hi"}]},
        timeout=5)
    assert chat.status in (502, 503)
    assert chat.json()["error"]["code"] in ("upstream_unavailable", "model_unavailable")
