"""A real two-node SLURM cluster on localhost for the launch tests (docs/design.md §8).

munged, slurmctld and two slurmd (`-N n1`, `-N n2`, ports 17001-17002) run as root from a
temporary folder; clients find them through SLURM_CONF. Every daemon is stopped by its pid
file afterwards. Needs root, Debian's slurm-wlm and munge, and `n1`/`n2` resolving to
127.0.0.1 (.ci/run sets all of this up).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")

CONF = """\
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket,cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldPort=16817
ReturnToService=2
KillWait=60
MinJobAge=600
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001-17002 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
"""


def unavailable_reason() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    if os.geteuid() != 0:
        return "the local SLURM cluster runs its daemons as root; this is not root"
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)"
    for name in ("n1", "n2"):
        try:
            socket.gethostbyname(name)
        except OSError:
            return f"node name {name!r} does not resolve: add '127.0.0.1 n1 n2' to /etc/hosts"
    return None


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        r = self.root
        (r / "state").mkdir(parents=True)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        subprocess.run(
            [
                "munged",
                f"--key-file={key}",
                f"--socket={r}/munge.socket",
                f"--pid-file={r}/munged.pid",
                f"--log-file={r}/munged.log",
                f"--seed-file={r}/munge.seed",
                "--force",
            ],
            check=True,
        )
        self.conf.write_text(CONF.format(root=r))
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        for node in ("n1", "n2"):
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", node], check=True, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout
            if sorted(line.split()[1] for line in out.splitlines()) == ["idle", "idle"]:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM nodes did not come up: sinfo says {out!r}; see {r}/*.log")

    def stop(self) -> None:
        for name in ("slurmd-n1", "slurmd-n2", "slurmctld", "munged"):
            pid_file = self.root / f"{name}.pid"
            try:
                pid = int(pid_file.read_text())
                os.kill(pid, 15)
            except (OSError, ValueError):
                continue
            for _ in range(100):  # wait until it is gone, so ports are free for the next start
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check)

    def job_state(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def diagnostics(self, job_id: str) -> str:
        """What SLURM says about a job, for a failing test's message: its record and the
        controller's log (a launch failure such as a revoked credential is only there)."""
        record = self.run("scontrol", "show", "job", job_id, check=False).stdout
        log = self.root / "slurmctld.log"
        lines = log.read_text().splitlines() if log.exists() else []
        tail = "\n".join([line for line in lines if "debug" not in line][-25:])
        return f"\n--- scontrol show job {job_id}\n{record}\n--- slurmctld.log (tail)\n{tail}"

    def wait(self, job_id: str, timeout: float = 600) -> dict[str, str]:
        """Block until the job (and, for an array, every task) has ended; its last state."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.run("squeue", "-h", "-j", job_id, check=False).stdout.strip():
                return self.job_state(job_id)
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still queued or running after {timeout} s")
