"""A real multi-node Slurm on one machine: each node a network namespace, for tests.

Each compute node ``nI`` is a network namespace with its own address on a bridge
(192.0.2.10+I, a documentation range that never leaves the machine), its own hostname (UTS
namespace), its own ``/etc/hosts``, Slurm ``TmpFS`` and ``/root/.ssh`` (mount namespace), its
own sshd and its own ``slurmd -N nI``; slurmctld runs on n0. A ``login`` namespace at 192.0.2.2
is not a compute node: the client commands (``sbatch``, ``rainforest ...``) run there, as a
user's would on a login node. No namespace has a default route, like compute nodes without
internet. The login node's own name resolves to 127.0.1.1 there, as Debian writes it.

Munged runs in the root namespace (its socket is a file every namespace sees), and the
filesystem is shared, as a cluster's scratch is. Each namespace is held open by a ``sleep``
that owns its UTS and mount namespaces; every daemon and command enters it with ``nsenter``.
``stop`` (and :meth:`MultiNode.power_cut`) kill every process of a namespace by pid, then
delete it: nothing else on the machine is touched.

Names carry a prefix (``MULTINODE_TAG``, default ``rf``, plus random letters) so that two
clusters on one machine cannot collide.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import netns
from localslurm import SCHEDULING_CONF, _program

ADDRESS_PREFIX = "192.0.2."
LOGIN_ADDRESS = ADDRESS_PREFIX + "2"

PROGRAMS = ("ip", "nsenter", "unshare", "ssh", "ssh-keygen", "munged", "mungekey", "slurmctld",
            "slurmd", "sbatch")

_CONF = """\
ClusterName=multi
SlurmctldHost=n0({ctld_address})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge-run/munge.sock,cred_expire=10
StateSaveLocation={root}/spool/ctld
SlurmdSpoolDir={root}/spool/%n
TmpFS={root}/tmp
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
{scheduling}{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

_SSHD_CONFIG = """\
Port 22
HostKey {root}/ssh/host_key
AuthorizedKeysFile {root}/dotssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
AcceptEnv *
"""

# A new cluster's ssh: no keepalives on either side (tests of a lost node check that), so
# they show what rainforest's launchers do about a silent node by themselves.
_SSH_CONFIG = """\
Host *
  IdentityFile {root}/dotssh/id_key
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
"""


def available() -> str | None:
    """None if this machine can run the cluster, else what is missing."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [name for name in PROGRAMS if shutil.which(name) is None
               and not os.path.exists(f"/usr/sbin/{name}")]
    if not os.path.exists("/usr/sbin/sshd"):
        missing.append("sshd (openssh-server)")
    return f"not installed: {', '.join(missing)} (scripts/install.sh installs them)" \
        if missing else None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class MultiNode:
    """``nodes`` compute nodes n0..n{nodes-1} plus a login namespace; start, then stop."""

    def __init__(self, nodes: int = 2, *, cpus: int = 1, kill_wait: int = 5) -> None:
        self.tag = os.environ.get("MULTINODE_TAG", "rf") + secrets.token_hex(2)
        self.names = [f"n{index}" for index in range(nodes)]
        self.addresses = {name: f"{ADDRESS_PREFIX}{10 + i}" for i, name in enumerate(self.names)}
        self.root = Path(tempfile.mkdtemp(prefix="rainforest-multinode-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        for sub in ("munge", "munge-run", "spool/ctld", "tmp", "run", "log", "ssh", "dotssh",
                    *(f"tmp-{name}" for name in self.names)):
            (self.root / sub).mkdir(parents=True)
        os.chmod(self.root / "munge-run", 0o755)
        self.conf = self.root / "slurm.conf"
        nodes_conf = "\n".join(f"NodeName={name} NodeAddr={address} CPUs={cpus} "
                               "RealMemory=4000 State=UNKNOWN"
                               for name, address in self.addresses.items())
        scheduling = SCHEDULING_CONF.format(root=self.root, kill_wait=kill_wait,
                                            slurmd_timeout=20)
        self.conf.write_text(_CONF.format(root=self.root, ctld_address=self.addresses["n0"],
                                          nodes=nodes_conf, scheduling=scheduling))
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        self.env["SLURM_CONF"] = str(self.conf)
        self._holders: dict[str, subprocess.Popen] = {}  # namespace name -> its sleep
        self._daemons: list[subprocess.Popen] = []
        self._namespaces: list[str] = []

    # ------------------------------------------------------------------ names and addresses
    def netns(self, host: str) -> str:
        return f"{self.tag}{host}"

    def _hosts_file(self, host: str) -> Path:
        path = self.root / f"hosts-{host}"
        # The login node's own name is Debian's 127.0.1.1; the nodes' names are their cluster
        # addresses everywhere, as a site's generated /etc/hosts has them. (Gloo under
        # horovodrun fails between nodes whose own names resolve to 127.0.1.1, even with
        # --network-interface: a peer then connects to 127.0.1.1.)
        lines = ["127.0.0.1 localhost",
                 *(f"{address} {name}" for name, address in self.addresses.items())]
        lines.append(f"127.0.1.1 {host}" if host == "login" else f"{LOGIN_ADDRESS} login")
        path.write_text("\n".join(lines) + "\n")
        return path

    # ------------------------------------------------------------------ start
    def start(self, timeout: float = 90) -> MultiNode:
        try:
            self._network()
            self._keys()
            self._munge()
            for host in ["login", *self.names]:
                self._hold(host)
            self._daemon("n0", _program("slurmctld"), "-D")
            for name in self.names:
                self._node_daemons(name)
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _node_daemons(self, name: str) -> None:
        self._daemon(name, "/usr/sbin/sshd", "-D", "-e", "-f",
                     str(self.root / "ssh" / "sshd_config"),
                     "-o", f"PidFile={self.root}/run/sshd-{name}.pid")
        self._daemon(name, _program("slurmd"), "-D", "-N", name)

    def _network(self) -> None:
        switch = self.netns("sw")
        _ip("netns", "add", switch)
        self._namespaces.append(switch)
        bridge = f"{self.tag}br"
        _ip("-n", switch, "link", "add", bridge, "type", "bridge")
        _ip("-n", switch, "link", "set", bridge, "up")
        for index, host in enumerate(["login", *self.names]):
            address = LOGIN_ADDRESS if host == "login" else self.addresses[host]
            namespace, outer, inner = self.netns(host), f"{self.tag}p{index}", \
                f"{self.tag}v{index}"
            _ip("netns", "add", namespace)
            self._namespaces.append(namespace)
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            _ip("link", "set", inner, "netns", namespace)
            _ip("link", "set", outer, "netns", switch)
            _ip("-n", switch, "link", "set", outer, "master", bridge)
            _ip("-n", switch, "link", "set", outer, "up")
            # Named eth0 on every node, as real clusters name the same interface alike.
            _ip("-n", namespace, "link", "set", inner, "name", "eth0")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")

    def _keys(self) -> None:
        ssh, dotssh = self.root / "ssh", self.root / "dotssh"
        for key in (ssh / "host_key", dotssh / "id_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True, capture_output=True)
        shutil.copy(dotssh / "id_key.pub", dotssh / "authorized_keys")
        (ssh / "sshd_config").write_text(_SSHD_CONFIG.format(root=self.root))
        (dotssh / "config").write_text(_SSH_CONFIG.format(root=self.root))
        # ssh reads ~/.ssh from the password file, not $HOME: each namespace binds ours there.
        Path("/root/.ssh").mkdir(mode=0o700, exist_ok=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    def _munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        subprocess.run([_program("mungekey"), "-c", "-k", str(key)], check=True,
                       capture_output=True)
        log = open(self.root / "log" / "munged.stdout", "ab")
        self._daemons.append(subprocess.Popen(
            [_program("munged"), "-F", f"--key-file={key}",
             f"--socket={self.root}/munge-run/munge.sock",
             f"--pid-file={self.root}/munge-run/munged.pid",
             f"--seed-file={self.root}/munge/munged.seed"],
            stdout=log, stderr=subprocess.STDOUT))

    def _hold(self, host: str) -> None:
        """A ``sleep`` that owns ``host``'s UTS and mount namespaces, set up as that host."""
        binds = [f"mount --bind {self._hosts_file(host)} /etc/hosts",
                 f"mount --bind {self.root}/dotssh /root/.ssh"]
        if host != "login":
            binds.append(f"mount --bind {self.root}/tmp-{host} {self.root}/tmp")
        script = f"hostname {host}; " + "; ".join(binds) + "; exec sleep infinity"
        # nsenter --net keeps the host's /sys mounted (`ip netns exec` remounts it, and slurmd
        # then finds no cgroup filesystem).
        holder = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns(host)}", "unshare", "--uts", "--mount",
             "--propagation", "private", "sh", "-c", script])
        self._holders[host] = holder
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._ready(host):
                return
            if holder.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"namespace {host} did not come up")

    def _ready(self, host: str) -> bool:
        pid = self._holders[host].pid
        try:
            # unshare execs sh, which execs sleep: same pid throughout.
            return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep")
        except OSError:
            return False

    def enter(self, host: str) -> list[str]:
        """The command prefix that runs a program on ``host`` ("login", "n0", ...)."""
        return ["nsenter", "-t", str(self._holders[host].pid), "--net", "--uts", "--mount"]

    def _daemon(self, host: str, *command: str) -> None:
        log = open(self.root / "log" / f"{Path(command[0]).name}-{host}.stdout", "ab")
        self._daemons.append(subprocess.Popen([*self.enter(host), *command], env=self.env,
                                              stdout=log, stderr=subprocess.STDOUT))

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout
            if sorted(states.split()) == sorted([*self.names, *["idle"] * len(self.names)]):
                return
            if any(p.poll() is not None for p in self._daemons):
                break
            time.sleep(0.3)
        raise RuntimeError(f"the nodes did not come up ({states!r}); logs in "
                           f"{self.root}/log:\n{self.logs()}")

    # ------------------------------------------------------------------ use
    def ssh_settings(self) -> str:
        """The ssh client config and sshd config every node uses, as written."""
        return "\n".join((self.root / name).read_text()
                         for name in ("dotssh/config", "ssh/sshd_config"))

    def run(self, *command: str, host: str = "login", check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:
        """``command`` on ``host`` (the login namespace by default), in ``cwd`` (default: this
        process's), with this cluster's environment unless ``env`` is given."""
        # nsenter --mount starts in / unless told where.
        folder = f"--wd={kwargs.pop('cwd', None) or os.getcwd()}"
        return subprocess.run([*self.enter(host), folder, *command],
                              env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              check=check, **kwargs)

    def submit(self, script: str, *args: str, script_args=(), env: dict | None = None,
               cwd: str | None = None) -> str:
        """``sbatch --parsable ARGS SCRIPT SCRIPT_ARGS`` from the login node, in ``cwd``
        (the job's submit folder); returns the job id."""
        result = self.run("sbatch", "--parsable", *args, script, *script_args,
                          env={**self.env, **(env or {})}, cwd=cwd)
        return result.stdout.strip().split(";")[0]

    def job_field(self, job: str, name: str) -> str | None:
        result = self.run("scontrol", "show", "job", job, "-o", check=False)
        for field in result.stdout.split():
            if field.startswith(name + "="):
                return field.split("=", 1)[1]
        return None

    def wait(self, job: str, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED",
                                                    "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
             ) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_field(job, "JobState")
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {self.job_field(job, 'JobState')} after "
                           f"{timeout} s\n{self.logs()}")

    def completed_jobs(self) -> list[dict[str, str]]:
        """Finished jobs from the jobcomp file (``sacct -c``): name, node list, state."""
        lines = self.run("sacct", "-c", "-n", "-P", "-o", "JobID,JobName,NodeList,State",
                         check=False).stdout.splitlines()
        return [dict(zip(("id", "name", "nodes", "state"), line.split("|"), strict=False))
                for line in lines if line.count("|") == 3]

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------------ stop
    def pids(self, host: str) -> list[int]:
        """Every process in ``host``'s network namespace."""
        return netns.pids(self.netns(host))

    def power_cut(self, host: str) -> None:
        """Take ``host``'s link down first, so that no peer gets a TCP reset, as in a real
        power cut; then kill every process in its namespace, slurmd and sshd included."""
        _ip("-n", self.netns(host), "link", "set", "eth0", "down")
        self._kill_namespace(host)

    def power_on(self, host: str, timeout: float = 90) -> None:
        """Boot a compute node that :meth:`power_cut` took down: a fresh holder for its
        namespaces, its link up, its sshd and slurmd started, and back to ``idle`` in Slurm
        (ReturnToService=2 takes a node that registers again out of ``down``)."""
        if host == "n0" or host not in self.names:
            raise ValueError(f"{host!r}: only a compute node without slurmctld can be revived")
        self._hold(host)
        _ip("-n", self.netns(host), "link", "set", "eth0", "up")
        self._node_daemons(host)
        self._wait_idle(timeout)

    def _kill_namespace(self, host: str) -> None:
        netns.kill_all(self.netns(host))
        # Its daemons are gone: reap them, so that a dead one no longer means a failed start.
        for process in [p for p in self._daemons if p.poll() is not None]:
            self._daemons.remove(process)

    def stop(self) -> None:
        if "login" in self._holders and self._daemons and self._daemons[-1].poll() is None:
            self.run("scancel", "--user=root", check=False, timeout=20)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if not self.run("squeue", "-h", check=False, timeout=20).stdout.strip():
                    break
                time.sleep(0.3)
        survivors = []
        for host in reversed([*self._holders]):
            try:
                self._kill_namespace(host)
            except RuntimeError as error:  # clean up the rest first, then say so
                survivors.append(str(error))
        for process in [*self._daemons, *self._holders.values()]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._daemons.clear()
        self._holders.clear()
        for namespace in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", namespace], check=False, capture_output=True)
        self._namespaces.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        if survivors:
            raise RuntimeError("; ".join(survivors))
