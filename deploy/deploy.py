#!/usr/bin/env python3
"""Roll routes.yaml out to the Mac Studio nodes: `deploy`, `status`, `logs` (run by make).

Order for `deploy` (so re-homing a model fails no request):
  1. per node: mkdir, rsync the code (install it into the venv only when it changed),
     rsync the MLX hostfiles of the sharded models whose rank 0 it runs (a changed hostfile
     counts as a changed service), rsync the rendered plists into ~/Library/LaunchAgents
     (itemized: only changed files are reported), list the io.maclustr.* plists installed
     there (stale = not rendered).
  2. every changed model server: bootout (if loaded) + bootstrap, then wait until its
     /health answers on the node.
  3. gateway node: rsync routes.yaml; restart the gateway if its plist or code changed,
     else SIGHUP it (launchctl kill HUP) so it reloads the table; wait for its /health.
  4. every stale service: wait until its port has no established connection (streams that
     started before the reload finish), then bootout and delete its plist.
Nothing changed -> no launchctl command is issued, so a second run is a no-op.

SSH and RSYNC are command strings (tests substitute recorders); with --dry-run every remote
command is printed instead of run, and what changed is predicted from the last deployed
plists kept in the state directory.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from maclustr.cluster import GATEWAY_LABEL, NodePlan, plan_cluster  # noqa: E402
from maclustr.config import ConfigError, load_routes  # noqa: E402

DOMAIN = "gui/$(id -u)"  # the login session of the ssh user: Metal needs a GUI session
AGENTS = "Library/LaunchAgents"  # relative to the remote home (rsync and ssh both start there)
CODE = ("maclustr", "setup.cfg", "pyproject.toml", "README.md")
# What `pip install <app>` leaves in the app directory: rsync must neither report nor delete
# it, or every deploy would see "changed code" and reinstall and restart the gateway.
BUILD_ARTIFACTS = ("/build/", "/*.egg-info/")
ITEM = re.compile(r"^([<>ch.*])(\S*)\s+(.+)$")


def _differ(a: Path, b: Path) -> set[str]:
    """Relative paths of files that are new, changed or gone between tree b and tree a."""
    fa = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()} if b.exists() \
        else set()
    return {n for n in fa | fb
            if n not in fa or n not in fb or not filecmp.cmp(a / n, b / n, shallow=False)}


class Deployer:
    def __init__(self, routes: Path, state: Path, ssh: str, rsync: str, dry: bool,
                 health_wait: int, drain: int, source: Path = ROOT) -> None:
        self.source = source
        self.routes = routes
        self.state = state
        self.ssh = shlex.split(ssh)
        self.ssh_str = ssh
        self.rsync = shlex.split(rsync)
        self.dry = dry
        self.health_wait = health_wait
        self.drain = drain

    # --- running commands ---------------------------------------------------------------

    def run(self, argv: list[str], *, check: bool = True) -> str:
        """Run (or, dry, print) one command; return its stdout."""
        print("+ " + shlex.join(argv), flush=True)
        if self.dry:
            return ""
        r = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        if r.stdout:
            sys.stdout.write("".join(f"  {line}\n" for line in r.stdout.splitlines()))
        if check and r.returncode != 0:
            raise SystemExit(f"deploy: command failed with {r.returncode}: {shlex.join(argv)}")
        return r.stdout

    def remote(self, plan: NodePlan, command: str, *, check: bool = True) -> str:
        return self.run([*self.ssh, plan.ssh, command], check=check)

    def sync(self, plan: NodePlan, part: str, dest: str, *, delete: bool = False,
             exclude: tuple[str, ...] = ()) -> set[str]:
        """rsync the staged `part`/ to node:dest/; the files whose content changed (new, edited
        or deleted). Dry: predicted from the last deployed copy."""
        src = self.state / "stage" / plan.node.name / part
        argv = [*self.rsync, "-rlt", "-z", "--checksum", "--itemize-changes",
                "--chmod=D755,F644", *(["--delete"] if delete else []),
                *(f"--exclude={x}" for x in exclude), "-e", self.ssh_str,
                f"{src}/", f"{plan.ssh}:{dest}/"]
        out = self.run(argv)
        if self.dry:
            return _differ(src, self.last(plan) / part)
        changed = set()
        for line in out.splitlines():
            m = ITEM.match(line.strip())
            if m and (m.group(1) in "<>" or m.group(1) == "*") and not line.endswith("/"):
                changed.add(m.group(3).strip())
        return changed

    # --- state ---------------------------------------------------------------------------

    def stage(self, plan: NodePlan) -> Path:
        """Local copy of exactly what goes to the node: app/, conf/, agents/."""
        d = self.state / "stage" / plan.node.name
        app = d / "app"
        if app.exists():
            shutil.rmtree(app)
        app.mkdir(parents=True)
        for name in CODE:
            src = self.source / name
            if src.is_dir():
                shutil.copytree(src, app / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif src.exists():
                shutil.copy2(src, app / name)
        conf = d / "conf"
        conf.mkdir(exist_ok=True)
        shutil.copyfile(self.routes, conf / "routes.yaml")
        agents = d / "agents"
        print("+ " + shlex.join(["maclustr", "plists", "--node", plan.node.name, "--out",
                                 str(agents), "--routes", str(self.routes)]), flush=True)
        r = subprocess.run([sys.executable, "-m", "maclustr", "plists", "--node",
                            plan.node.name, "--out", str(agents), "--routes", str(self.routes)],
                           cwd=ROOT, stdout=subprocess.DEVNULL)
        if r.returncode != 0:
            raise SystemExit(f"deploy: rendering the plists of {plan.node.name} failed")
        hosts = d / "hosts"
        if hosts.exists():
            shutil.rmtree(hosts)
        hosts.mkdir()
        for svc in plan.services:
            if svc.shards:
                argv = ["maclustr", "hostfile", "--routes", str(self.routes), "--model",
                        svc.alias]
                print("+ " + shlex.join(argv) + f" > {hosts / svc.label}.json", flush=True)
                r = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT,
                                   stdout=subprocess.PIPE)
                if r.returncode != 0:
                    raise SystemExit(f"deploy: rendering the hostfile of {svc.alias} failed")
                (hosts / f"{svc.label}.json").write_bytes(r.stdout)
        return d

    def last(self, plan: NodePlan) -> Path:
        return self.state / "last" / plan.node.name

    def installed(self, plan: NodePlan) -> set[str]:
        if self.dry:
            self.remote(plan, f"ls -1 ~/{AGENTS}/ 2>/dev/null | grep '^io\\.maclustr\\.' || true")
            return {p.name for p in (self.last(plan) / "agents").glob("io.maclustr.*.plist")}
        out = self.remote(plan, f"ls -1 ~/{AGENTS}/ 2>/dev/null | grep '^io\\.maclustr\\.' "
                                f"|| true")
        return {n.strip() for n in out.splitlines() if n.strip().endswith(".plist")}

    # --- the steps -----------------------------------------------------------------------

    def wait_healthy(self, plan: NodePlan, host: str, port: int) -> None:
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{host}:{port}/health"
        self.remote(plan, f"i=0; until curl -fsS -m 2 -o /dev/null {url}; do i=$((i+1)); "
                          f"[ $i -ge {self.health_wait} ] && exit 1; sleep 1; done")

    def load(self, plan: NodePlan, label: str) -> None:
        # bootstrap right after bootout can fail with "5: Input/output error" while launchd
        # is still tearing the old job down: retry once.
        boot = f"launchctl bootstrap {DOMAIN} ~/{AGENTS}/{label}.plist"
        self.remote(plan, f"launchctl bootout {DOMAIN}/{label} 2>/dev/null; "
                          f"{boot} || (sleep 3 && {boot})")

    def deploy(self) -> int:
        table = load_routes(self.routes)
        plans = plan_cluster(table)
        for p in plans:
            self.stage(p)
        changed: dict[str, set[str]] = {}
        stale: dict[str, set[str]] = {}
        code_changed: dict[str, bool] = {}
        for p in plans:
            self.remote(p, f"mkdir -p {p.app_dir} {p.dir}/conf {p.log_dir} ~/{AGENTS} "
                           f"&& mkdir -p -m 700 $(dirname {p.env_file})")
            code = self.sync(p, "app", p.app_dir, delete=True, exclude=BUILD_ARTIFACTS)
            code_changed[p.node.name] = bool(code)
            if code:
                self.remote(p, f"(test -x {p.venv}/bin/python || python3 -m venv {p.venv}) && "
                               f"{p.venv}/bin/pip install -q {p.app_dir} && "
                               f"{p.venv}/bin/pip install -q --force-reinstall --no-deps "
                               f"{p.app_dir} && "
                               f"(test -x {p.venv}/bin/mlx_lm.server || "
                               f"{p.venv}/bin/pip install -q mlx-lm)")
            hosts = self.sync(p, "hosts", p.hosts_dir, delete=True)
            got = self.sync(p, "agents", AGENTS)
            changed[p.node.name] = {Path(n).name for n in got if n.endswith(".plist")} | {
                f"{Path(n).stem}.plist" for n in hosts if n.endswith(".json")
                and f"{Path(n).stem}.plist" in {f"{s.label}.plist" for s in p.services}}
            wanted = {f"{label}.plist" for label in p.labels}
            stale[p.node.name] = self.installed(p) - wanted
        # 2. new and changed model servers first, each healthy before anything points at it
        for p in plans:
            for svc in p.services:
                if f"{svc.label}.plist" in changed[p.node.name]:
                    self.load(p, svc.label)
        for p in plans:
            for svc in p.services:
                if f"{svc.label}.plist" in changed[p.node.name]:
                    self.wait_healthy(p, svc.bind, svc.port)
        # 3. the gateway switches to the new table
        gw = next(p for p in plans if p.gateway)
        routes_changed = bool(self.sync(gw, "conf", f"{gw.dir}/conf"))
        gw_label = f"{GATEWAY_LABEL}.plist"
        if gw_label in changed[gw.node.name]:
            self.load(gw, GATEWAY_LABEL)
            self.wait_healthy(gw, "127.0.0.1", gw.gateway_port)
        elif code_changed[gw.node.name]:
            self.remote(gw, f"launchctl kickstart -k {DOMAIN}/{GATEWAY_LABEL}")
            self.wait_healthy(gw, "127.0.0.1", gw.gateway_port)
        elif routes_changed:
            self.remote(gw, f"launchctl kill HUP {DOMAIN}/{GATEWAY_LABEL}")
        # 4. old servers stop once their last stream is done
        for p in plans:
            for name in sorted(stale[p.node.name]):
                label = name.removesuffix(".plist")
                # mlx_lm.server closes every connection after its response, so an
                # established connection to its port is a request still being answered.
                self.remote(p, f"port=$(/usr/libexec/PlistBuddy -c 'Print :ProgramArguments' "
                               f"~/{AGENTS}/{name} 2>/dev/null | grep -A1 -e '--port' | tail -n 1"
                               f" | tr -d ' '); [ -z \"$port\" ] || {{ sleep 1; i=0; "
                               f"while lsof -nP -iTCP:$port -sTCP:ESTABLISHED >/dev/null 2>&1; "
                               f"do i=$((i+1)); [ $i -ge {self.drain} ] && break; sleep 1; "
                               f"done; }}")
                self.remote(p, f"launchctl bootout {DOMAIN}/{label} 2>/dev/null; "
                               f"rm -f ~/{AGENTS}/{name}")
        if not self.dry:
            for p in plans:
                last = self.last(p)
                if last.exists():
                    shutil.rmtree(last)
                shutil.copytree(self.state / "stage" / p.node.name, last)
        total = sum(len(c) for c in changed.values()) + sum(len(s) for s in stale.values())
        print(f"deploy: {'would change' if self.dry else 'changed'} {total} service(s)"
              + ("" if total else " (nothing to do)"))
        return 0

    def status(self) -> int:
        plans = plan_cluster(load_routes(self.routes))
        for p in plans:
            if p.gateway:
                self.remote(p, f"curl -sS -m 10 'http://127.0.0.1:{p.gateway_port}/health?deep=1'"
                               "; echo", check=False)
            for label in p.labels:
                self.remote(p, f"launchctl print {DOMAIN}/{label} | grep -E "
                               f"'^[[:space:]]*(state|pid|last exit code|runs) ' || "
                               f"echo '{label}: not loaded'", check=False)
        return 0

    def logs(self, lines: int) -> int:
        for p in plan_cluster(load_routes(self.routes)):
            self.remote(p, f"tail -n {lines} {p.log_dir}/io.maclustr.*.log", check=False)
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["deploy", "status", "logs"])
    ap.add_argument("--routes", default="routes.yaml")
    ap.add_argument("--state", default=".deploy", help="local staging + last deployed plists")
    ap.add_argument("--ssh", default="ssh")
    ap.add_argument("--rsync", default="rsync")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--health-wait", type=int, default=600,
                    help="seconds a new model server may take to load (default: %(default)s)")
    ap.add_argument("--drain", type=int, default=900,
                    help="seconds to let streams on a moved server finish (default: %(default)s)")
    ap.add_argument("--lines", type=int, default=50)
    ap.add_argument("--source", default=str(ROOT), help="checkout whose code is deployed")
    a = ap.parse_args(argv)
    d = Deployer(Path(a.routes).resolve(), Path(a.state).resolve(), a.ssh, a.rsync, a.dry_run,
                 a.health_wait, a.drain, Path(a.source).resolve())
    try:
        if a.command == "deploy":
            return d.deploy()
        if a.command == "status":
            return d.status()
        return d.logs(a.lines)
    except ConfigError as e:
        print(f"deploy: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
