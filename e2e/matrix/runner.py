"""Runs rows on one simulated node: each row in each of its modes, check by check.

A row runs on the real driver, a kubelet emulator and sandboxed unprivileged
"pods" (e2e/node.py) and goes through these checks, stopping at the first
that fails:

* mount: the program, uid 65534 without capabilities, mounts the volume;
* read: a second container of the pod, as uid 1000, reads a known file
  through mount propagation;
* write (writable programs): that container writes a file, reads it back,
  and the file reaches the program's backing store;
* unmount: `fusermount3 -u` in the pod removes the mount and the program
  exits (and, for programs that save writes on unmount, the file is saved);
* kill: a fresh instance is SIGKILLed; its mount is detached anyway (by the
  broker, which watches the daemon's process, or by the starter).

A program that cannot work (catalogue.CANNOT_WORK) has one check instead,
"refused": run as a pod would, it exits without mounting and without a
request to the broker.

Whatever a check leaves behind (sandboxes, published volumes, the row's
workspace) is cleaned up after the row, whether it passed or not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from csi_async._proto import v1beta1 as dp
from csi_async.deviceplugin.devices import ID_PREFIX, FuseDevices
from e2e.kubelet import Pod
from e2e.matrix.catalogue import select, select_cannot_work
from e2e.matrix.result import FAIL, NOT_RUN, PASS, REFUSED, CheckFailed, Result
from e2e.matrix.row import (
    DATA,
    EXAMPLES,
    FS_SCRIPTS,
    PROXY,
    READER_UID,
    STARTER,
    WRITTEN_FILE,
    WRITTEN_TEXT,
    CannotWork,
    Implementation,
    Served,
    Workspace,
)
from e2e.matrix.services import Services
from e2e.node import FuseVolume, Node
from e2e.sandbox import NOBODY, Container, DeviceSpec, PodSandbox

FS_SCRIPTS_ON_HOST = Path(__file__).resolve().parent.parent / "fs"
TIMEOUT = 15.0  # for each wait of each check


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _ppid(pid: int) -> int | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(data[data.rindex(")") + 2 :].split()[1])


def _argv0(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (OSError, UnicodeDecodeError):
        return ""


def _tail(path: Path, limit: int = 300) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    return " / ".join(lines[-3:])[-limit:]


class Run:
    """One row in one mode on the node: the checks, and everything to clean up."""

    def __init__(self, node: Node, impl: Implementation, mode: str, ws: Workspace) -> None:
        self.node = node
        self.impl = impl
        self.mode = mode
        self.ws = ws
        self.pod = Pod(f"{impl.name}-{mode}")
        self.volume: FuseVolume | None = None
        self.sandboxes: list[PodSandbox] = []
        self.served = Served()
        self.program: Container | None = None
        self.stderr = ws.path / "program.stderr"
        self.instance = 0
        self.killed_cleanup = ""

    # -------------------------------------------------------------- helpers

    def _sandbox(self, binds: dict[str, Path], **kwargs: Any) -> PodSandbox:
        sandbox = self.node.sandbox(binds, **kwargs)
        self.sandboxes.append(sandbox)
        return sandbox

    @property
    def target(self) -> Path:
        assert self.volume is not None
        return self.volume.target

    def _start_program(self) -> Container:
        assert self.volume is not None
        self.instance += 1
        self.stderr = self.ws.path / f"program-{self.instance}.stderr"
        sandbox = self._sandbox(
            {**self.volume.binds(DATA), **self.served.binds}, **program_devices(self.mode)
        )
        argv = self.impl.command(self.mode, self.served.values)
        with self.stderr.open("wb") as err:
            return sandbox.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=err)  # fmt: skip

    def _wait_mounted(self, program: Container) -> str:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                mount = self.node.wait_mounted(self.target, timeout=0)
            except TimeoutError:
                pass
            else:
                return self._check_mount(mount.fstype, mount.mount_options, mount.super_options)
            if program.poll() is not None:
                raise CheckFailed(
                    f"exited {program.returncode} without mounting: {_tail(self.stderr)}"
                )
            if time.monotonic() > deadline:
                raise CheckFailed(f"not mounted within {TIMEOUT:.0f} s: {_tail(self.stderr)}")
            time.sleep(0.02)

    @staticmethod
    def _check_mount(fstype: str, options: Sequence[str], super_options: Sequence[str]) -> str:
        if not {"nosuid", "nodev"} <= set(options):
            raise CheckFailed(f"mounted without nosuid,nodev: {','.join(options)}")
        if f"user_id={NOBODY}" not in super_options:
            raise CheckFailed(f"not owned by the pod's uid: {','.join(super_options)}")
        return fstype

    def _as_reader(self, script: str, *args: str) -> str:
        """Run a shell script in another container of the pod, as READER_UID."""
        reader = self._sandbox({DATA: self.target}, uid=READER_UID, gid=READER_UID)
        try:
            done = reader.run(["sh", "-c", script, "sh", *args], capture_output=True,
                              timeout=TIMEOUT)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"uid {READER_UID} got no answer within {TIMEOUT:.0f} s") from None
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip().splitlines()
            raise CheckFailed(f"exit {done.returncode}: {err[-1] if err else ''}")
        out: str = done.stdout.decode(errors="replace")
        return out

    def _broker_events(self) -> list[str]:
        """What the driver logged about this volume: request ops and detaches."""
        events = []
        for entry in self.node.driver.log_entries():
            if str(self.target) not in json.dumps(entry, default=str):
                continue
            if "op" in entry:
                events.append(f"{entry['op']}:{entry.get('decision', '')}")
            elif "detached its dead mount" in str(entry.get("msg", "")):
                events.append("detached-dead")
        return events

    # -------------------------------------------------------------- checks

    def setup(self) -> None:
        self.volume = self.node.publish_fuse_volume(self.pod)
        self.served = self.impl.setup(self.ws)

    def mount(self) -> str:
        self.program = self._start_program()
        fstype = self._wait_mounted(self.program)
        return f"{fstype}, user_id={NOBODY}, nosuid,nodev"

    def read(self) -> str:
        served = self.served
        if served.read_text is None:
            listing = self._as_reader(f'ls -A "{DATA}/$1"', served.read_file).split()
            return f"uid {READER_UID} listed the root: {listing or 'empty'}"
        text = self._as_reader(f'cat "{DATA}/$1"', served.read_file)
        if text != served.read_text:
            raise CheckFailed(f"read {text!r}, expected {served.read_text!r}")
        return f"uid {READER_UID} read {served.read_file}"

    def write(self) -> str:
        path = self.served.write_dir + WRITTEN_FILE
        text = self._as_reader(f'printf %s "$1" > "{DATA}/$2" && cat "{DATA}/$2"',
                               WRITTEN_TEXT, path)  # fmt: skip
        if text != WRITTEN_TEXT:
            raise CheckFailed(f"read back {text!r}")
        if self.served.verify_write is not None:
            self.served.verify_write()
            return f"uid {READER_UID} wrote {WRITTEN_FILE}; it reached the backing store"
        return f"uid {READER_UID} wrote {WRITTEN_FILE} and read it back"

    def unmount(self) -> str:
        assert self.volume is not None and self.program is not None
        sandbox = self._sandbox(self.volume.binds(DATA))
        done = sandbox.run(["fusermount3", "-u", DATA], capture_output=True, timeout=TIMEOUT)
        if done.returncode != 0:
            raise CheckFailed(f"fusermount3 -u: {done.stderr.decode(errors='replace').strip()}")
        try:
            self.node.wait_unmounted(self.target, TIMEOUT)
        except TimeoutError:
            raise CheckFailed("still mounted after fusermount3 -u") from None
        try:
            status = self.program.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            raise CheckFailed(
                f"unmounted, but the program still runs after {TIMEOUT:.0f} s"
            ) from None
        if self.served.verify_after_unmount is not None:
            self.served.verify_after_unmount()
            return f"fusermount3 -u; the program exited {status} and saved the write"
        return f"fusermount3 -u; the program exited {status}"

    def kill(self) -> str:
        seen = len(self._broker_events())
        program = self._start_program()
        self._wait_mounted(program)
        # The mount appears before the broker hands its fd over; killing the
        # pod before that only tests the broker's failed-handoff path.
        self._wait_for_event(seen, {"mount:allowed"}, "the broker never handed the fd over")
        pid = self._program_pid(program)
        name = _comm(pid)
        os.kill(pid, signal.SIGKILL)
        try:
            self.node.wait_unmounted(self.target, TIMEOUT)
        except TimeoutError:
            raise CheckFailed(f"still mounted {TIMEOUT:.0f} s after SIGKILL of {name}") from None
        # Who did it (the log may trail the unmount a little).
        events = self._wait_for_event(seen, {"detached-dead", "unmount:allowed"}, "", 3.0)
        if "detached-dead" in events:
            self.killed_cleanup = "broker"
            by = "the broker saw the daemon exit and detached the dead mount"
        elif "unmount:allowed" in events:
            self.killed_cleanup = "starter" if self.mode == STARTER else "auto_unmount watcher"
            by = f"the {self.killed_cleanup} unmounted"
        else:
            self.killed_cleanup = "unknown"
            by = f"unmounted, by whom the broker's log does not say ({events})"
        return f"SIGKILL of {name}: {by}"

    def _wait_for_event(
        self, seen: int, wanted: set[str], failure: str, timeout: float = TIMEOUT
    ) -> list[str]:
        """Broker events for this volume after the first `seen`, once one is in `wanted`.

        On timeout: CheckFailed(failure), or the events so far if failure is "".
        """
        deadline = time.monotonic() + timeout
        while True:
            events = self._broker_events()[seen:]
            if wanted & set(events):
                return events
            if time.monotonic() > deadline:
                if failure:
                    raise CheckFailed(f"{failure} (broker events: {events})")
                return events
            time.sleep(0.02)

    def _program_pid(self, program: Container) -> int:
        """The FUSE program: the container's PID 1, or the starter's child once it runs."""
        init = program.init_pid()
        if init is None:
            raise CheckFailed(f"the program exited: {_tail(self.stderr)}")
        if self.mode != STARTER:
            return init
        # The starter forks, then execs the program: wait for the exec.
        argv0 = self.impl.command(PROXY, self.served.values)[0]
        deadline = time.monotonic() + TIMEOUT
        while True:
            for pid in program.processes():
                if _ppid(pid) == init and _argv0(pid) == argv0:
                    return pid
            if time.monotonic() > deadline:
                raise CheckFailed(f"the starter did not run {argv0}")
            time.sleep(0.02)

    def cleanup(self) -> None:
        errors: list[BaseException] = []
        for sandbox in self.sandboxes:
            try:
                sandbox.kill_all()
            except (OSError, TimeoutError, subprocess.SubprocessError) as err:
                errors.append(err)
        if self.volume is not None:
            for name in (self.volume.name, *self.volume.companion_volumes):
                try:
                    self.node.unpublish(self.pod, name)
                except Exception as err:
                    errors.append(err)
        if errors:
            raise errors[0]


def _short(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


Report = Callable[[str], None]


def run_implementation(
    node: Node, impl: Implementation, mode: str, services: Services, examples: Path,
    workdir: Path, report: Report,
) -> Result:  # fmt: skip
    notes = [*impl.notes]
    result = Result(
        impl.name, f"{impl.library.name} {impl.library.version(examples)}",
        impl.version(examples), mode, PASS, notes=notes, optional=impl.optional,
    )  # fmt: skip
    report(f"{impl.name} ({result.version}, {result.library}), {mode} mode")
    ws = Workspace(Path(tempfile.mkdtemp(prefix=f"{impl.name}-{mode}-", dir=workdir)), services)
    ws.path.chmod(0o755)
    run = Run(node, impl, mode, ws)
    checks: list[tuple[str, Callable[[], str]]] = [
        ("mount", run.mount), ("read", run.read),
        *([("write", run.write)] if impl.writable else []),
        ("unmount", run.unmount), ("kill", run.kill),
    ]  # fmt: skip
    try:
        try:
            run.setup()
        except Exception as err:
            result.status, result.failed_check, result.reason = FAIL, "setup", _short(err)
            report(f"  {'setup':<8} FAIL  {result.reason}")
            return result
        for check, do in checks:
            started = time.monotonic()
            try:
                detail = do()
            except Exception as err:
                result.timings[check] = time.monotonic() - started
                result.status, result.failed_check, result.reason = FAIL, check, _short(err)
                report(f"  {check:<8} FAIL  {result.timings[check] * 1000:6.0f} ms  "
                       f"{result.reason}")  # fmt: skip
                return result
            result.timings[check] = time.monotonic() - started
            result.details[check] = detail
            result.killed_cleanup = run.killed_cleanup
            report(f"  {check:<8} ok    {result.timings[check] * 1000:6.0f} ms  {detail}")
        return result
    finally:
        try:
            run.cleanup()
        except Exception as err:
            if result.status == PASS:
                result.status, result.failed_check = FAIL, "cleanup"
                result.reason = _short(err)
            report(f"  cleanup  FAIL  {_short(err)}")
        shutil.rmtree(ws.path, ignore_errors=True)


def program_devices(mode: str) -> dict[str, Any]:
    """The FUSE program's container's devices: what a pod gets in each mode.

    proxy: the pod asks for the device plugin's resource, and the runtime makes
    exactly the device nodes that the plugin's own Allocate answers (csi_async's
    FuseDevices, the code kubelet talks to). The node's /dev/fuse is 0600 here
    (no udev rule), so the node goes to the pod's user, as containerd's
    device_ownership_from_security_context does. starter: no /dev/fuse at all;
    the starter needs none.
    """
    if mode != PROXY:
        return {"dummy_dev_fuse": False}
    request = dp.AllocateRequest(
        container_requests=[dp.ContainerAllocateRequest(devices_ids=[f"{ID_PREFIX}0"])]
    )
    (answer,) = FuseDevices(count=1).allocate(request).container_responses
    devices = [DeviceSpec(d.container_path, d.host_path, d.permissions) for d in answer.devices]
    return {
        "dummy_dev_fuse": False,
        "device_ownership_from_security_context": True,
        "devices": devices,
    }


def _refused(node: Node, item: CannotWork, ws: Workspace) -> str:
    """Run the program in a pod of its own; it must exit without reaching the broker."""
    pod = Pod(f"{item.name}-cannot-work")
    volume = node.publish_fuse_volume(pod)
    sandboxes: list[PodSandbox] = []
    try:
        served = item.setup(ws)
        # With the device plugin's /dev/fuse: even a real device node does not help.
        sandbox = node.sandbox({**volume.binds(DATA), **served.binds}, **program_devices(PROXY))
        sandboxes.append(sandbox)
        stderr = ws.path / "program.stderr"
        with stderr.open("wb") as err:
            program = sandbox.spawn(item.command(served.values), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        try:
            status = program.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"still running after {TIMEOUT:.0f} s: {_tail(stderr)}") from None
        try:
            node.wait_mounted(volume.target, timeout=0)
        except TimeoutError:
            pass
        else:
            raise CheckFailed("it mounted the volume: it works after all")
        asked = [e for e in node.driver.log_entries()
                 if "op" in e and str(volume.target) in json.dumps(e, default=str)]  # fmt: skip
        if asked:
            raise CheckFailed(f"it reached the broker: {asked[0].get('op')}")
        if status == 0:
            # A daemon's parent exits 0 once it has mounted, wherever that was.
            raise CheckFailed(f"it exited 0, as after a mount: {_tail(stderr)}")
        return f"exited {status} without asking the broker: {_tail(stderr)}"
    finally:
        for sandbox in sandboxes:
            sandbox.kill_all()
        node.unpublish(pod, volume.name)
        for name in volume.companion_volumes:
            node.unpublish(pod, name)


def run_cannot_work(
    node: Node, item: CannotWork, services: Services, examples: Path, workdir: Path,
    report: Report,
) -> Result:  # fmt: skip
    result = Result(item.name, "-", item.version(examples), PROXY, REFUSED, reason=item.reason)
    report(f"{item.name} ({result.version}): expected not to work")
    ws = Workspace(Path(tempfile.mkdtemp(prefix=f"{item.name}-", dir=workdir)), services)
    ws.path.chmod(0o755)
    started = time.monotonic()
    try:
        detail = _refused(node, item, ws)
    except Exception as err:
        result.status, result.failed_check, result.reason = FAIL, "refused", _short(err)
        report(f"  refused  FAIL  {result.reason}")
    else:
        result.details["refused"] = detail
        report(f"  refused  ok    {detail}")
    finally:
        result.timings["refused"] = time.monotonic() - started
        shutil.rmtree(ws.path, ignore_errors=True)
    return result


def not_run(impl: Implementation, missing: Sequence[str], report: Report) -> Result:
    reason = impl.why_missing or f"missing {', '.join(missing)}"
    report(f"{impl.name} ({impl.library.name}): not run: {reason}")
    return Result(impl.name, impl.library.name, "-", "-", NOT_RUN, reason=reason,
                  notes=[*impl.notes], optional=impl.optional)  # fmt: skip


def run_matrix(
    zipapp: Path,
    examples: Path,
    *,
    only: Sequence[str] | None = None,
    report: Report = print,
) -> list[Result]:
    """Run the selected rows in each of their modes on one simulated node."""
    implementations = select(only)
    workdir = Path(tempfile.mkdtemp(prefix="csi-async-matrix-"))
    workdir.chmod(0o755)
    services = Services(workdir)
    results: list[Result] = []
    try:
        binds = {EXAMPLES: examples, FS_SCRIPTS: FS_SCRIPTS_ON_HOST}
        with Node(workdir, zipapp, shared_binds=binds) as node:
            for impl in implementations:
                missing = impl.missing(examples)
                if missing:
                    results.append(not_run(impl, missing, report))
                    continue
                for mode in impl.modes:
                    result = run_implementation(
                        node, impl, mode, services, examples, workdir, report
                    )
                    results.append(result)
            for item in select_cannot_work(only):
                missing = item.missing()
                if missing:
                    reason = f"missing {', '.join(missing)}"
                    report(f"{item.name}: not run: {reason}")
                    results.append(Result(item.name, "-", "-", "-", NOT_RUN, reason=reason))
                    continue
                results.append(run_cannot_work(node, item, services, examples, workdir, report))
    finally:
        services.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return results
