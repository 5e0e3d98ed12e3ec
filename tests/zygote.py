"""A Python whose imports are done, starting ``python -m fff_lightning`` commands for the tests as forks of itself
-- as ``sweep`` starts its runs (``fff_lightning.sweep._start_forked``) -- so a test that runs the command line pays
its ~8 s of imports once per test worker rather than once per command. Started by ``helpers.cli``; it never runs
a tensor operation itself (a fork after torch's OpenMP pool has run hangs).

Protocol, one JSON object a line: on stdin ``{"argv", "cwd", "env", "out", "err"}`` (output file paths); on
stdout ``{"pid"}`` once the command started, and ``{"exited": pid, "code"}`` when a command ended (any order).
"""

import json
import os
import select
import sys

from fff_lightning import console, sweep

console.quiet()  # as `python -m fff_lightning` does before its imports
sweep._preload()
# The commands' stdin is /dev/null, not this process's requests.
_null = os.open(os.devnull, os.O_RDONLY)
_requests = os.dup(0)
os.dup2(_null, 0)


def start(req: dict) -> int:
    home = os.getcwd()
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    try:
        with open(req["out"], "w") as out, open(req["err"], "w") as err:
            return sweep._start_forked(req["argv"], out, err)
    finally:
        os.chdir(home)


def send(msg: dict) -> None:
    os.write(1, (json.dumps(msg) + "\n").encode())


def main() -> None:
    buf = b""
    while True:
        ready, _, _ = select.select([_requests], [], [], 0.05)
        if ready:
            data = os.read(_requests, 65536)
            if not data:  # the test worker is gone
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                send({"pid": start(json.loads(line))})
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    sys.stdout.flush()
    main()
