#!/usr/bin/env python3
# /// script
# requires-python = ">=3.8"
# dependencies = ["pyyaml"]
# ///
"""pegasus.py: run a bag of shell jobs on the machines you can ssh into.

Write hosts.yaml (where to run) and queue.yaml (what to run), then:

    ./pegasus.py q      queue mode: each job runs once, on the next free slot
    ./pegasus.py b      broadcast mode: each job runs on every slot, in lock-step
    ./pegasus.py l      lock mode: lock queue.yaml and open it in an editor

or, without files, hosts and commands on the command line (or stdin, "-"):

    ./pegasus.py b -H 'node-[1-8]' 'nvidia-smi -L'
    ./pegasus.py q --slurm - < jobs.txt     (the nodes of this Slurm allocation)

Hosts and jobs may be parametrized (a mapping of lists expands to the
cartesian product) and are filled in with Handlebars templates. Jobs that
start move from queue.yaml to consumed.yaml; the queue file keeps the user's
comments and layout. With -d/--daemon an empty queue does not end the run.

How it works: one ssh ControlMaster per host (the system `ssh`, so the user's
~/.ssh/config applies), every job a cheap session on it. A single `selectors`
loop reads every job's output, exits, signals and timers. Each job runs under
a small `sh` wrapper that kills the job's process group when its ssh
connection goes away, so jobs never outlive pegasus. An fcntl lock on a
sidecar file (queue.yaml.lock) guards the queue file against lock mode and
other runners. Each runner journals the jobs it has taken and not finished
(queue.yaml.<node>.<pid>.running), so that the next one started on the
queue puts back what a crashed runner was running.

Needs Python 3.8+, OpenSSH 7.6+, Linux or macOS, and one package: PyYAML.
Templates are rendered by a small Handlebars renderer of its own, as Pegasus
reads them. This is a re-creation of Pegasus (the Rust crate pegasus-ssh) and
reads the same files.
"""

import argparse
import array
import contextlib
import collections
import datetime
import errno
import fcntl
import gc
import glob
import heapq
import itertools
import json
import os
import re
import resource
import select
import selectors
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import unicodedata

yaml = None  # PyYAML, imported by need_yaml(): `--help` and `s` do without it

__version__ = "0.1.0"

# ----------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------

EXIT_OK = 0            # every job succeeded
EXIT_FAILED = 1        # at least one job failed
EXIT_USAGE = 2         # bad command line, bad file, no host reachable
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C or SIGTERM before the queue was done
EXIT_PIPE = 141        # our output's reader went away (`| head`), as if killed by SIGPIPE

LOCAL_HOSTNAMES = {"localhost", "127.0.0.1", "::1"}

# sshd's MaxSessions defaults to 10 per connection and the master keeps one
# session for itself, so at most this many jobs share one master; a hostname
# with more slots gets a second master.
SESSIONS_PER_MASTER = 8

# A line longer than this is printed in pieces, so a job that writes
# gigabytes without a newline cannot exhaust memory.
MAX_LINE = 1 << 20

READ_SIZE = 1 << 16
# A pipe that one read found full is widened to WIDE_PIPE and read
# WIDE_READ at a time: its writer (a master, a busy job) then hands over
# all it holds in one write, where with 64 kB it kept the rest and moved
# it up in its buffer for every packet it added (W3: a fifth of the
# masters' CPU). Pipe buffers count against the user's
# pipe-user-pages-soft (64 MB on Linux), past which every new pipe of
# theirs gets two pages, so at most WIDE_PIPES are wide at once.
WIDE_PIPE = 1 << 20
WIDE_READ = 1 << 18
WIDE_PIPES = 16
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031 if sys.platform.startswith("linux") else None)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032 if sys.platform.startswith("linux") else None)
# A read lease on a retired queue file says whether anyone writes it (Linux).
F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024 if sys.platform.startswith("linux") else None)
# The first byte of an agent's marker nonces: one that text hardly ever
# holds, so that a read is searched for markers with memchr (find_mark).
MARK_BYTE = b"\x1f"
QUEUE_POLL = 0.5       # how often to stat the queue file while waiting on it
LOCK_RETRY = 0.2       # how often to retry the queue lock while lock mode holds it
HOST_CHECK_DELAY = 0.5  # after a job's ssh exits 255, when to look whether its master died
RECONNECT_FIRST = 2.0  # seconds before reconnecting a lost host; doubles each failure ...
RECONNECT_MAX = 60.0   # ... up to this
CONNECT_WAIT = 20.0    # a master not logged in by then is killed, its host counted down
MAX_CONNECTING = 64    # ssh handshakes in flight at once
CONNECT_NOTES = 10     # hosts that cannot be reached named one by one; then one line
MASTER_CLOSE_WAIT = 2.0  # at exit, masters get this long to close before SIGKILL
WRITE_RETRY = 5.0      # after a failed write of the queue file, when to try again
STATUS_PERIOD = 0.25   # status line redraws and state file saves, at most this often
STOP_WAIT = 2.0        # how long `pegasus.py stop` waits for a runner to take the stop
EDIT_WATCH = 0.2       # how often lock mode looks for `>>` appends while the editor runs
PEEK_PERIOD = 1.0      # jobs added while no take comes are counted this often ...
PEEK_MAX = 1 << 20     # ... in a queue file of at most this many bytes
PROGRESS_PERIOD = 30.0  # without a terminal, a progress line this often (if anything changed)
PUT_BACK_WAIT = 30.0   # at exit, how long to wait for the lock to put jobs back
LOOKAHEAD = 1000       # jobs a backfill looks at past the head, at most
CANCEL_GRACE = 5       # a cancelled job gets SIGTERM, then SIGKILL this many seconds later
CANCEL_FORCE = 3.0     # ... and this long after that, pegasus ends its session itself
# (the agent's KILL may come up to a second late, by its clock in whole seconds, and it
# looks for a runner the KILL took every second: 2 s left no margin under load)
START_TRIES = 3        # a job that cannot be started goes back this many times, then fails
ARGV_MAX = 16 * 1024   # a longer command travels on the session's stdin, not in argv
OUTPUT_HIGH = 16 << 20  # unwritten output at which pegasus stops reading jobs' pipes ...
OUTPUT_LOW = 1 << 20   # ... until it is down to this
OUTPUT_SETTLE = 0.002  # once a full wide pipe on stdout has room, wait this long to write
OUTPUT_EXIT_WAIT = 2.0  # stopped by a signal, how long pegasus waits for stdout's reader
MASTER_UP = "pegasus-master-up"  # what a master prints once it has logged in
MAX_ENTRY_JOBS = 10 ** 9  # combinations in one queue entry; more is surely a mistake
MAX_SLOTS = 100000     # slots in a hosts file, all expanded in memory
MAX_NESTING_HINT = 1000  # above this rough depth, parse with the Python parser (see compose_list)
DRY_RUN_SHOWN = 1000   # jobs a dry run prints; it counts the rest
HISTORY_TAKES = 4096   # recent takes kept to undo a stale save of the queue file (rebase),
HISTORY_BYTES = 16 << 20  # ... as long as their edits hold no more text than this
RETIRED_WATCH = 10.0   # seconds to watch a replaced queue file for late `>>` appends
RETIRED_MAX = 32       # ... and at most this many of them
SETTLE = 1.0           # s a queue file must stay still before a last line without its
#                        newline, or a rewrite in place, counts as written (QueueFile)
AHEAD_WINDOW = 0.05    # s: jobs that end this fast are taken ahead of free slots...
AHEAD_MAX = 16         # ... at most this many per slot, to save takes (QueueMode)
AHEAD_HOLD = 0.5       # s: jobs taken ahead and not started by then go back to the queue
MIN_FREE_BYTES = 1 << 16  # free disk, beyond the queue file's size, needed to start
TEMP_MARK = "pegasus-"  # in the names of the queue file's temporary files ...
STALE_TEMP_AGE = 600.0  # ... removed at start when a crash left them this long ago

# Options for every ssh we start. They come after the user's own -o options
# because ssh keeps the first value it sees for each option.
SSH_OPTIONS = (
    "-o", "BatchMode=yes",            # fail, never prompt for a password
    "-o", "ConnectTimeout=15",        # a host that does not answer fails in bounded time
    "-o", "ServerAliveInterval=15",   # a hung connection (frozen host, cut cable)
    "-o", "ServerAliveCountMax=4",    # ... is declared dead after about a minute
)

# The script every job runs under, on a host or locally, as
#   sh -c 'DECODE RUN' sh ENCODED_COMMAND     (on a host, through its login shell)
#   sh -c 'READ_LINE RUN' sh                  (a long command, sent on stdin)
#   sh -c 'RUN' sh COMMAND                    (locally)
# DECODE turns the \0NNN escapes back into bytes with printf %b; READ_LINE
# first reads them as one line from stdin (pegasus writes nothing after it).
# RUN starts a watcher in the background on the wrapper's stdin: pegasus never
# writes there, so EOF means pegasus closed it on purpose (cancel) or died, or
# the connection dropped. Then `kill -TERM 0` signals the whole process group,
# which sshd made for this session (and pegasus, locally, with
# start_new_session), and CANCEL_GRACE seconds later `kill -KILL 0` ends what
# ignored it (the watcher ignores TERM itself to live that long). The command
# runs in this very shell, with an empty stdin and no positional parameters,
# so $$, `exit` and `kill $$` mean what they mean under `sh -c`; when it ends,
# the EXIT trap kills the watcher, so what the job left running in the
# background is left alone. (A job that replaces the shell with `exec`, or
# sets its own EXIT trap, keeps the watcher until the session ends, and so
# loses such leftovers.) A process that left the group (`setsid`) cannot be
# reached this way: it has detached on purpose. The watcher uses only
# builtins until it fires: a fork and no exec, which matters for thousands of
# short jobs. The text holds no backslash, `!`, newline or single quote, so
# every login shell (sh, bash, zsh, fish, tcsh) passes it through single
# quotes untouched.
# The command ($c ends with one character added, a newline or a space, so that
# a closing comment or `&` ends before `;;`) is parsed whole, inside a case,
# before any of it runs, with the parser's stderr muted (fd 4 keeps the real
# one, restored first thing): a syntax error would otherwise be reported as
# eval's, showing the wrapper. Then nothing has run, and `sh -c` runs the
# command as written to report the error in sh's own words. `command` keeps
# the failed eval from ending the shell; `exit` after the case keeps the
# fallback from running after the command did.
DECODE = 'c=$(printf %b "$1"x);c=${c%x};'
READ_LINE = 'c=$(head -n 1);c=$(printf %b "$c"x);c=${c%x};'
RUN = (
    'exec 3<&0 </dev/null;'
    '(trap "" TERM;while read -r _;do :;done;kill -TERM 0;sleep ' + str(CANCEL_GRACE) +
    ';kill -KILL 0) <&3 >/dev/null 2>&1 &'
    'exec 3<&-;'
    'trap "kill -KILL $! 2>/dev/null" EXIT;'
    'set --;'
    'command eval "case : in *) unset c;exec 2>&4 4>&-;$c;; esac;exit" 4>&2 2>/dev/null;'
    'sh -c -- "${c%?}"'
)

# The agent: one long-lived bash on a host per slot in use, fed jobs on its
# stdin, so that a job costs a fork and an exec there instead of an ssh
# session (sshd's fork, a login shell, the wrapper). It is sent as the first
# line of the session's stdin (AGENT_BOOT reads it, through any login shell),
# prints AGENT_READY, then reads one line per request:
#   j<nonce> <command as printf %b escapes>   run it
#   k                                          cancel the running job
#   q                                          quit, leaving leftovers alone
# Each job runs as `sh -c COMMAND` (so $$, exit and syntax errors are sh's),
# with an empty stdin, in a process group of its own (set -m) that a cancel
# signals: TERM, then KILL after CANCEL_GRACE. Its output goes straight to
# the session's stdout and stderr, framed by markers that carry a nonce
# pegasus chose for it and the job never sees (MARK_BYTE, 20 hex digits):
#   "<nonce> s\n"         on both streams: the job starts; what came before
#                         it was written by an earlier job's leftovers
#   "<nonce> e<code>\n"   on stdout, "<nonce> e\n" on stderr: it ended
#   "<nonce> e<code> c\n" on stdout instead: it ended after a cancel's TERM
#                         had reached it (whatever its exit status says)
#   "<nonce> r\n"         on stdout: not run; a background process of the
#                         last job still lives and may write to these
#                         streams, so this agent retires and pegasus starts
#                         the job on a fresh one
# A marker is found anywhere, not only at a line's start: a last line
# without a newline ends where the marker begins. Each marker must reach
# the stream in one write, or a background process's write could land
# inside it and hide it: bash's stdout is line-buffered, so a marker holds
# no newline but its last byte.
# While a job runs, the agent looks every second whether its runner (the
# subshell that writes the end markers, in the job's process group) is still
# there: a job that kills its own process group (`kill -9 0`) or its parent
# takes the runner with it, and the agent then ends what is left of the group
# (TERM, then KILL, as a cancel, unless one is under way: a group just
# killed may linger as zombies) and reports the runner's death as the job's
# end (128+signal). Other signals a job sends its group (`kill -USR1 0`) the
# runner traps (RUNNER_TRAPS), so that the job stays in pegasus's hands. A
# cancelled job (its runner got TERM) ends once its process group is gone:
# the runner hands the end markers to a watcher outside the group, which
# waits for that (w(): KILL after CANCEL_GRACE), so the slot's next job never
# runs beside what is left of it.
# (A request cut by that second's timeout is kept: `read -t` leaves the part
# it read in the variable.) During a cancel it looks every 0.1 s: bash reaps
# its children only between commands, and the watcher that waits for the
# job's process group to be gone sees the runner until it is reaped.
# EOF on stdin (pegasus closed it, died, or the connection dropped) ends a
# running job the way a cancel does, then the agent; what an earlier job
# left running is left alone, as with a session per job. After the TERM,
# w() sends the KILL once CANCEL_GRACE is over, or ends as soon as the
# job's process group is gone, and it holds none of the session's streams:
# a cancelled job's session can end at once (a `sleep` that cannot take
# 0.1 counts seconds instead). bash 4 or newer,
# not sh, because dash has no job control without a terminal, and for
# `printf -v` and `read -t` with a status that tells a timeout from EOF. Its
# own stderr goes to /dev/null: job-control notices must not reach a job's
# stream; the jobs get the real one (fd 4).
AGENT_READY = "pegasus-agent-1"
# The signals a job may send its own process group (`kill -USR1 0`) that
# would otherwise end its runner, which is in that group: the runner traps
# them and lives on (a trap, unlike an ignore, is not passed on to the job).
RUNNER_TRAPS = ("HUP", "INT", "QUIT", "ABRT", "USR1", "USR2", "PIPE", "ALRM", "VTALRM", "PROF",
                "XCPU", "XFSZ", "TSTP", "TTIN", "TTOU")
AGENT = """[ "${BASH_VERSINFO[0]}" -ge 4 ] || { echo "pegasus's agent needs bash 4 or newer" >&2; exit 97; }
exec 4>&2 2>/dev/null
set -m
g= n= r= p= t= o=1
w() { local i=0 e=$((SECONDS + @SECONDS@)); while [ $i -lt @TICKS@ ] && [ $SECONDS -lt $e ] &&
  kill -0 -"$g"; do
  if sleep 0.1; then i=$((i+1)); else sleep 1; i=$((i+10)); fi; done; kill -KILL -"$g"; }
printf '%s\\n' @READY@
while :; do
  if [ -n "$r" ]; then
    IFS= read -r -t $o l; s=$?
    if [ $s -gt 128 ]; then
      p=$p$l
      if ! kill -0 "$g"; then
        wait "$g"; s=$?; r=
        if [ $s -gt 128 ]; then
          if [ -z "$t" ] && kill -0 -"$g"; then kill -TERM -"$g"; w </dev/null >/dev/null; fi
          printf '%s e%d\\n' "$n" "$s"; printf '%s e\\n' "$n" >&4
        fi
      fi
      continue
    fi
    [ $s -eq 0 ] || break
  else
    IFS= read -r l || break
  fi
  l=$p$l p=
  case $l in
  j*)
    m=${l%% *}; m=${m#j}
    if [ -n "$g" ]; then
      wait "$g"
      if kill -0 -"$g"; then printf '%s r\\n' "$m"; exit 0; fi
    fi
    n=$m t= o=1; printf -v c %b "${l#* }"
    printf '%s s\\n' "$n"; printf '%s s\\n' "$n" >&4
    (q=$BASHPID x=; trap x=1 TERM; trap : @SIGNALS@
     sh -c -- "$c" </dev/null 2>&4 4>&-; s=$?
     if [ -z "$x" ]; then printf '%s e%d\\n' "$n" "$s"; printf '%s e\\n' "$n" >&4; exit; fi
     set -m; (g=$q; w </dev/null >/dev/null; printf '%s e%d c\\n' "$n" "$s"
       printf '%s e\\n' "$n" >&4) &) &
    g=$! r=1 ;;
  k)
    t=1 o=0.1; kill -TERM -"$g"
    w </dev/null >/dev/null & ;;
  q) exit 0 ;;
  esac
done
if [ -n "$g" ] && kill -0 "$g"; then kill -TERM -"$g"; w; fi
""".replace("@READY@", AGENT_READY).replace("@TICKS@", str(int(CANCEL_GRACE * 10))).replace(
    "@SECONDS@", str(int(CANCEL_GRACE) + 1)).replace(
    "@SIGNALS@", " ".join(RUNNER_TRAPS))
# What the login shell runs: read the first line, decode it, run it. No
# backslash, `!`, newline or single quote, as for RUN. Without bash this
# fails (127) and the host gets one ssh session per job instead.
AGENT_BOOT = "exec bash -c 'IFS= read -r a;printf -v a %b \"$a\";eval \"$a\"'"

MASTER_MALLOC = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=8388608"

# What a queue file's appended bytes begin with when they start an entry
# (or a comment) of their own: see QueueFile.join().
NEW_ENTRY = re.compile(rb"[ \t]*(?:-(?:[ \t\r\n]|$)|#)")
TOP_ENTRY = re.compile(rb"(?:-(?:[ \t\r\n]|$)|#)")  # ... at the top level
# What lock mode appends to a queue file its editor's save replaced: the
# editor read that many bytes of it (see mode_lock, read_by_save).
EDITOR_READ = b"# pegasus l: the editor read %d bytes\n"
EDITOR_READ_LINE = re.compile(rb"^# pegasus l: the editor read (\d+) bytes\n", re.M)
# ... and what a runner appends to the queue file its own write replaced, for
# the other runners that read it (see QueueFile.say_what_we_read).
RUNNER_READ = b"# pegasus: runner %d read %d bytes, and carries what comes after\n"
RUNNER_READ_LINE = re.compile(rb"^# pegasus: runner \d+ read \d+ bytes[^\n]*\n", re.M)

# Bytes that may stand as themselves in the encoded command: safe inside
# single quotes in every shell above. All others become \0NNN.
SAFE_BYTES = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _./,:=+@-")
ENCODED_BYTES = [chr(b) if b in SAFE_BYTES else "\\0%03o" % b for b in range(256)]

# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


class PegasusError(Exception):
    """A problem the user can fix; str(e) is the whole message."""


class StopScan(Exception):
    """Raised by a chooser to end a walk of the queue: take nothing more now."""


class QueueWriteError(PegasusError):
    """queue.yaml or consumed.yaml could not be written (disk full, permissions)."""


# ----------------------------------------------------------------------------
# Files: hosts.yaml and queue.yaml entries, and their cartesian expansion
# ----------------------------------------------------------------------------

YAML_LOADER = None   # set by need_yaml()
ENTRY_DUMPER = None
LIST_DUMPER = None


def need_yaml():
    """Import PyYAML on first use; it costs 15 ms that `--help` need not pay."""
    global yaml, YAML_LOADER, ENTRY_DUMPER, LIST_DUMPER
    if yaml is not None:
        return
    try:
        import yaml as module
    except ImportError:
        raise PegasusError(install_hint("PyYAML")) from None
    yaml = module
    # Scalars stay the text the user wrote ("8", "yes", "1.10"): the base loader
    # resolves no implicit types. The C versions are ~6x faster where libyaml is.
    YAML_LOADER = getattr(yaml, "CBaseLoader", yaml.BaseLoader)

    class EntryDumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):
        """Writes multi-line commands as literal blocks, which people can read."""

    EntryDumper.add_representer(str, _represent_str)
    ENTRY_DUMPER = EntryDumper

    class ListDumper(EntryDumper):
        """For the rest of a big sweep: `[8, 16, 32]` on one line, numbers
        unquoted (pegasus reads every value as text anyway), so that it
        costs about what the user wrote."""

    ListDumper.yaml_implicit_resolvers = dict(
        (first, [(tag, regexp) for tag, regexp in resolvers
                 if not tag.endswith((":int", ":float"))])
        for first, resolvers in EntryDumper.yaml_implicit_resolvers.items())
    LIST_DUMPER = ListDumper


def install_hint(missing, in_venv=None, managed=None):
    """How to get PyYAML, for the Python running now: one message."""
    if in_venv is None:
        in_venv = sys.prefix != sys.base_prefix
    if managed is None:  # Debian's and Fedora's Python: pip refuses even --user
        import sysconfig
        managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"),
                                              "EXTERNALLY-MANAGED"))
    fetch = "`uv run pegasus.py ...` or `pipx run pegasus.py ...` (they fetch them)"
    if in_venv:
        return "needs %s: pip install pyyaml (into this venv, %s)" % (
            missing, sys.prefix)
    if managed:
        return ("needs %s, and pip may not install into this system Python: run it as %s, "
                "or in a venv: python3 -m venv ~/pegasus-venv && ~/pegasus-venv/bin/pip "
                "install pyyaml && ~/pegasus-venv/bin/python pegasus.py ..."
                % (missing, fetch))
    return "needs %s: python3 -m pip install --user pyyaml, or run it as %s" % (
        missing, fetch)


class Job:
    """One command to run: its template text and its parameters, in file order."""

    __slots__ = ("command", "params", "slots")

    def __init__(self, command, params=(), slots=1):
        self.command = command     # template text, as written in queue.yaml
        self.params = dict(params)  # name -> value (str)
        self.slots = slots         # how many of a host's slots it needs (GPUs)

    def canonical(self):
        """The queue.yaml entry that runs exactly this job again."""
        if not self.params and self.slots == 1:
            return self.command
        return job_spec(self)

    def key(self):
        return (self.command, tuple(self.params.items()), self.slots)

    def __eq__(self, other):
        return isinstance(other, Job) and self.key() == other.key()

    def __repr__(self):
        return "Job(%r, %r)" % (self.command, self.params)


class Slot:
    """A host plus one combination of its parameters: what hosts.yaml expands
    to. It has `capacity` slots, numbered 0..capacity-1 (GPUs, say); a job
    holds some of them while it runs, so a 1-slot host runs one job at a time."""

    def __init__(self, index, hostname, params, capacity=1):
        self.index = index          # position in the expanded hosts list
        self.hostname = hostname    # rendered; what ssh connects to
        self.params = dict(params)  # name -> value, in file order
        self.capacity = capacity
        self.free = list(range(capacity))  # slot numbers no job holds
        self.connections = []      # the masters its jobs can run over
        self.runs = set()           # the Runs in progress here
        pairs = ",".join("%s=%s" % item for item in self.params.items())
        if capacity != 1:
            pairs = "slots=%d" % capacity + ("," + pairs if pairs else "")
        self.label = "[%s (%s)]" % (hostname, pairs) if pairs else "[%s]" % hostname

    @property
    def state(self):
        """"up" if a job can start here now; else "connecting" or "down"."""
        states = {c.state for c in self.connections}
        if "up" in states:
            return "up"
        return "connecting" if states & {"connecting", "queued"} else "down"

    def down(self):
        """Its host counts as down: no connection is up, and none is in its
        first login (a failed or lost one that is being retried counts)."""
        return self.state != "up" and all(c.state == "down" or c.failures or c.ever_up
                                          for c in self.connections)

    @property
    def ever_up(self):
        return any(c.ever_up for c in self.connections)

    def connection(self):
        """The least busy master that is up, for the next job: one with a
        session to spare first (see Master.room)."""
        return min((c for c in self.connections if c.state == "up"),
                   key=lambda c: (c.room() == 0, c.sessions))

    @property
    def is_local(self):
        return self.hostname.strip().lower() in LOCAL_HOSTNAMES


def read_text(path):
    """The file's text; every way it can fail is a PegasusError naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise PegasusError("%s: no such file" % path) from None
    except IsADirectoryError:
        raise PegasusError("%s: is a directory, not a YAML file" % path) from None
    except PermissionError:
        raise PegasusError("%s: cannot read: permission denied" % path) from None
    return decode_text(path, data)


def decode_text(path, data):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PegasusError("%s:%d: not UTF-8 text (save it as UTF-8)" % (path, line)) from None


def compose_list(path, text):
    """The top-level YAML sequence node of `text`, or None for an empty file."""
    need_yaml()
    loader = YAML_LOADER
    if nesting_hint(text) > MAX_NESTING_HINT:
        # libyaml's composer recurses in C and crashes the process (SIGSEGV)
        # on deep nesting, such as 50,000 '['; Python's raises RecursionError.
        loader = yaml.BaseLoader
    try:
        root = yaml.compose(text, Loader=loader)
    except yaml.YAMLError as e:
        raise PegasusError(yaml_error(path, text, e)) from None
    except RecursionError:
        raise PegasusError("%s: nested too deeply to be a list of entries" % path) from None
    if root is None:
        return None
    if not isinstance(root, yaml.SequenceNode):
        raise PegasusError("%s:%d: the file must be a YAML list (lines starting with '- '), "
                           "not a %s" % (path, root.start_mark.line + 1, node_kind(root)))
    refuse_aliases(path, root)
    return root


def yaml_error(path, text, error):
    """PyYAML's message as one line naming the file, line and column, without
    its `in "<unicode string>"` and the excerpt it draws with a caret."""
    mark = getattr(error, "problem_mark", None)
    if mark is None:  # a ReaderError: a character YAML does not allow
        line = text.count("\n", 0, getattr(error, "position", 0)) + 1
        detail = re.sub(r'\s*in "<unicode string>",? position \d+', "", str(error))
        return "%s:%d: invalid YAML: %s" % (path, line, " ".join(detail.split()))
    message = error.problem or "invalid"
    if error.context:
        at = error.context_mark
        message += " (%s%s)" % (error.context, "" if at is None else
                                " at line %d, column %d" % (at.line + 1, at.column + 1))
    if "\\t" in message:
        message += "; indent with spaces, not tabs"
    return "%s:%d:%d: invalid YAML: %s" % (path, mark.line + 1, mark.column + 1, message)


def nesting_hint(text):
    """A cheap upper bound of how deep `text` nests: open flow brackets,
    plus the most block indicators and indentation on one line."""
    depth = deepest = 0
    for char in re.findall(r"[\[\]{}]", text):
        depth = depth + 1 if char in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    lines = text.splitlines() or [""]
    block = max(len(line) - len(line.lstrip()) + line.count("- ") + line.count(": ")
                for line in lines)
    return deepest + block


def refuse_aliases(path, root):
    """An alias (*name) repeats a node: a few bytes can stand for 10^13 jobs.
    The composer shares the node, so a repeat is a node seen twice."""
    seen = set()
    for number, entry in enumerate(root.value, 1):
        nodes = [entry]
        if isinstance(entry, yaml.MappingNode):
            nodes += [node for pair in entry.value for node in pair]
        nodes += [item for node in nodes if isinstance(node, yaml.SequenceNode)
                  for item in node.value]
        for node in nodes:
            if id(node) in seen:
                raise PegasusError("%s repeats a value through a YAML alias (*name); "
                                   "write the values out" % where(path, entry, number))
            seen.add(id(node))


def node_kind(node):
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return "scalar"


def where(path, node, number):
    return "%s:%d: entry %d" % (path, node.start_mark.line + 1, number)


NUMBER_STARTS = frozenset("0123456789+-.")


def is_number(node):
    """True for a plain scalar such as 5 or 1.5: a typo, not a command."""
    if node.style or node.value[:1] not in NUMBER_STARTS:  # quoted, or surely not a number
        return False
    tag = yaml.SafeLoader.resolve(yaml.SafeLoader, yaml.ScalarNode, node.value, (True, False))
    return tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def parse_entry(path, node, number, key):
    """A hosts.yaml or queue.yaml entry as {name: [values]}, `key` first."""
    here = where(path, node, number)
    if isinstance(node, yaml.ScalarNode):
        if is_number(node) or not node.value.strip():
            raise PegasusError("%s is %r, not a %s (quote it if you mean it)"
                               % (here, node.value, key))
        return {key: [node.value]}
    if isinstance(node, yaml.SequenceNode):
        raise PegasusError("%s is a nested list; write a string or a mapping with a '%s' key"
                           % (here, key))
    spec = {}
    for key_node, value_node in node.value:
        name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if name is None:
            raise PegasusError("%s has a key that is not a plain name" % here)
        if name in spec:
            raise PegasusError("%s has the key %r twice" % (here, name))
        spec[name] = parse_values(here, name, value_node)
    if key not in spec:
        raise PegasusError("%s has no '%s' key (keys: %s)" % (here, key, ", ".join(spec)))
    check_slots(here, spec)
    spec = dict([(key, spec.pop(key))] + list(spec.items()))
    if combinations(spec) > MAX_ENTRY_JOBS:
        raise PegasusError("%s expands to %d combinations, more than the %d pegasus "
                           "accepts in one entry; split it" % (here, combinations(spec),
                                                               MAX_ENTRY_JOBS))
    return spec


def combinations(spec):
    """How many jobs (or slots) an entry expands to, without expanding it."""
    size = 1
    for key, values in spec.items():
        if key != "slots":
            size *= len(values)
    return size


def parse_values(here, name, node):
    if isinstance(node, yaml.ScalarNode):
        return [node.value]
    if isinstance(node, yaml.SequenceNode):
        values = []
        for item in node.value:
            if not isinstance(item, yaml.ScalarNode):
                raise PegasusError("%s: '%s' holds a %s; values must be plain strings"
                                   % (here, name, node_kind(item)))
            values.append(item.value)
        if not values:
            raise PegasusError("%s: '%s' is an empty list, so the entry would expand "
                               "to nothing" % (here, name))
        return values
    raise PegasusError("%s: '%s' is a mapping; give a value or a list of values" % (here, name))


def expand(spec):
    """Every combination of a spec's values: first key outermost, last innermost."""
    keys = list(spec)
    for values in itertools.product(*spec.values()):
        yield dict(zip(keys, values))


def expand_jobs(spec):
    """An entry's jobs, lazily, in order."""
    spec = dict(spec)
    slots = int(spec.pop("slots", ["1"])[0])  # checked by parse_entry
    for combo in expand(spec):
        command = combo.pop("command")
        yield Job(command, combo, slots)


def remainder(spec, taken):
    """The entries (specs) that hold exactly the jobs of `spec` but those at
    the positions `taken` (sorted), in the same order. Each run of jobs
    between two taken ones is a range of the cartesian order, which fits in
    at most two entries per dimension: O(parameters), not O(combinations)."""
    keys = [key for key in spec if key != "slots"]
    sizes = [len(spec[key]) for key in keys]
    specs, start = [], 0
    for stop in list(taken) + [combinations(spec)]:
        for digits, low, high in index_ranges(sizes, start, stop):
            box = {}
            for depth, key in enumerate(keys):
                values = spec[key]
                if depth < len(digits):
                    values = [values[digits[depth]]]
                elif depth == len(digits):
                    values = values[low:high]
                box[key] = values
            if "slots" in spec:
                box["slots"] = spec["slots"]
            specs.append(dict((key, box[key]) for key in spec))
        start = stop + 1
    return specs


def index_ranges(sizes, start, stop):
    """Cover positions [start, stop) of the cartesian order of `sizes` (first
    outermost) with boxes (digits, low, high): the combinations whose first
    len(digits) indices are `digits`, the next in [low, high), the rest any."""
    if start >= stop:
        return []
    inner = 1
    for size in sizes[1:]:
        inner *= size
    head, head_rest = divmod(start, inner)
    tail, tail_rest = divmod(stop, inner)
    if head_rest and head == tail:
        return [((head,) + d, low, high)
                for d, low, high in index_ranges(sizes[1:], head_rest, tail_rest)]
    boxes = []
    if head_rest:
        boxes += [((head,) + d, low, high)
                  for d, low, high in index_ranges(sizes[1:], head_rest, inner)]
        head += 1
    if head < tail:
        boxes.append(((), head, tail))
    if tail_rest:
        boxes += [((tail,) + d, low, high)
                  for d, low, high in index_ranges(sizes[1:], 0, tail_rest)]
    return boxes


def check_slots(here, spec):
    """`slots: N` is a count, not a parameter to expand: one whole number >= 1."""
    values = spec.get("slots")
    if values is not None and (len(values) != 1 or not values[0].isdigit()
                               or int(values[0]) < 1):
        raise PegasusError("%s: 'slots' must be one whole number of 1 or more, not %s"
                           % (here, ", ".join(values)))


def check_hostname(name, here):
    # ssh would read "-oProxyCommand=..." as an option; whitespace and control
    # characters are never part of a real hostname and hide mistakes.
    if not name or name.startswith("-") or any(c.isspace() or ord(c) < 32 or c == "\x7f"
                                              for c in name):
        raise PegasusError("%s: refusing hostname %r: it is empty, starts with '-', "
                           "or holds whitespace or control characters" % (here, name))


RANGE = re.compile(r"\[(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)\]")
TEMPLATE_TAG = re.compile(r"\{\{.*?\}\}", re.S)


def expand_ranges(name):
    """Host ranges as pdsh, clush and Slurm write them: node-[01-16],
    gpu[1-4,7], rack[1-2]-n[1-3] (leftmost range outermost). A range whose
    first number has a leading zero keeps that width."""
    if "[" in name or "]" in name:
        check_ranges(name)
    match = RANGE.search(name)
    if match is None:
        return [name]
    numbers = []
    for part in match.group(1).split(","):
        first, _, last = part.partition("-")
        last = last or first
        if int(last) < int(first):
            raise PegasusError("host range [%s] in %r goes backwards" % (part, name))
        if int(last) - int(first) >= MAX_SLOTS:
            raise PegasusError("host range [%s] in %r has more than %d hosts"
                               % (part, name, MAX_SLOTS))
        width = len(first) if first.startswith("0") else 0
        numbers += [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    head, tail = name[:match.start()], name[match.end():]
    return [head + number + rest for number in numbers for rest in expand_ranges(tail)]


def check_ranges(name):
    # No hostname holds a bracket: one left over is a range mistyped
    # (node-[1-4, node[a-c]), which would otherwise become a host so named.
    rest = RANGE.sub("", TEMPLATE_TAG.sub("", name))
    if "[" in rest or "]" in rest:
        raise PegasusError("bad host range in %r: write it as [1-4] or [01-04,07]" % name)


def expand_hostlist(text):
    """A comma-separated list of hosts with ranges (-H, SLURM_JOB_NODELIST):
    "gpu[01-04,07],cpu5" -- commas inside brackets belong to the range."""
    pieces, depth, start = [], 0, 0
    for position, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth <= 0:
            pieces.append(text[start:position])
            start, depth = position + 1, 0
    pieces.append(text[start:])  # an unclosed bracket runs to the end: an error below
    return [name for piece in pieces if piece.strip() for name in expand_ranges(piece.strip())]


def hosts_from_list(texts, source):
    """Slots for hostnames given as lists (-H a,b -H c[1-2], or Slurm's)."""
    slots = []
    for text in texts:
        try:
            names = expand_hostlist(text)
        except PegasusError as e:
            raise PegasusError("%s: %s" % (source, e)) from None
        for name in names:
            check_hostname(name, source)
            slots.append(Slot(len(slots), name, {}))
    if not slots:
        raise PegasusError("%s: no hosts given" % source)
    return slots


def slurm_hosts(environ):
    """The nodes of the Slurm allocation this runs in."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise PegasusError("--slurm: SLURM_JOB_NODELIST is not set, so this is not inside "
                           "a Slurm allocation (run it from salloc or an sbatch script)")
    return hosts_from_list([nodelist], "SLURM_JOB_NODELIST")


def label_copies(slots, source):
    """The same slot twice (one host listed twice, overlapping ranges) runs
    two jobs there at once, as in Pegasus; that may be meant, so it is
    allowed, but said once, and each copy gets a label of its own."""
    seen, repeated = {}, []
    for slot in slots:
        count = seen[slot.label] = seen.get(slot.label, 0) + 1
        if count > 1:
            if count == 2:
                repeated.append(slot.label)
            slot.label = "%s #%d]" % (slot.label[:-1], count)
    if repeated:
        note("%s lists the same host more than once: %s; each copy runs a job of its own "
             "at the same time (say 'slots: N' in a hosts file to mean it)"
             % (source, ", ".join("%s %d times" % (label, seen[label]) for label in repeated)))
    return slots


def read_hosts(path):
    """The expanded slots of a hosts file, in order."""
    text = read_text(path)
    root = compose_list(path, text)
    if root is None or not root.value:
        raise PegasusError("%s: no hosts in the file" % path)
    slots = []
    for number, node in enumerate(root.value, 1):
        here = where(path, node, number)
        check_host_slots(here, node)
        spec = parse_entry(path, node, number, "hostname")
        try:
            spec["hostname"] = [h for value in spec["hostname"] for h in expand_ranges(value)]
        except PegasusError as e:
            raise PegasusError("%s: %s" % (here, e)) from None
        capacity = int(spec.pop("slots", ["1"])[0])
        if len(slots) + combinations(spec) > MAX_SLOTS:
            raise PegasusError("%s: the file expands to more than %d slots" % (here, MAX_SLOTS))
        for combo in expand(spec):
            template = combo.pop("hostname")
            hostname = render(template, dict(combo, hostname=template),
                              "hostname of %s" % here)
            check_hostname(hostname, here)
            slots.append(Slot(len(slots), hostname, combo, capacity))
    return slots


def check_host_slots(here, node):
    """In Pegasus a host's `slots` is an ordinary parameter; here it is the
    host's number of GPU slots. A list (`slots: [a, b]`, a sweep in Pegasus)
    must not quietly become a count."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value == "slots" \
                and not isinstance(value, yaml.ScalarNode):
            raise PegasusError("%s: 'slots' is a list, but a host's 'slots' is its number of "
                               "slots (slots: 4); for a parameter, use another name" % here)


def dump_entry(value, indent=0):
    """One YAML list item (`- ...` lines) for a canonical entry."""
    need_yaml()
    dumper, flow = ENTRY_DUMPER, False
    if isinstance(value, dict) and any(len(values) > 1 for values in value.values()):
        dumper, flow = LIST_DUMPER, None  # None: lists of scalars in flow style
    text = yaml.dump([value], Dumper=dumper, default_flow_style=flow,
                     allow_unicode=True, sort_keys=False, width=1 << 30)
    if flow is None:
        text = tighten_lists(text, value)
    if indent:
        pad = " " * indent
        text = "".join(pad + line for line in text.splitlines(True))
    return text


def dump_entries(values):
    """dump_entry() of each value, joined; plain commands in a row go
    through one yaml.dump (a dumper costs ~15 us to set up: a burst of
    short jobs lists thousands in consumed.yaml)."""
    need_yaml()
    out, plain = [], []
    for value in list(values) + [None]:
        if isinstance(value, str):
            plain.append(value)
            continue
        if plain:
            out.append(yaml.dump(plain, Dumper=ENTRY_DUMPER, default_flow_style=False,
                                 allow_unicode=True, sort_keys=False, width=1 << 30))
            plain = []
        if value is not None:
            out.append(dump_entry(value))
    return "".join(out)


_flow_items = {}  # value -> its text as an item of a flow list, as PyYAML writes it


def tighten_lists(text, spec):
    """Write the flow lists of an entry as [a,b,c], not [a, b, c]: what is
    left of a large sweep is mostly such lists (a 1000-value one is 1 kB
    smaller). Each list is rebuilt from its items as PyYAML writes them, and
    only replaced where that rebuilds its line exactly."""
    for values in spec.values():
        if len(values) < 2:
            continue
        items = []
        for value in values:
            item = _flow_items.get(value)
            if item is None:
                item = yaml.dump([value], Dumper=LIST_DUMPER, default_flow_style=True,
                                 allow_unicode=True, width=1 << 30).strip()[1:-1]
                if len(_flow_items) < 100000:
                    _flow_items[value] = item
            items.append(item)
        loose = ": [%s]\n" % ", ".join(items)
        if text.count(loose) == 1:
            text = text.replace(loose, ": [%s]\n" % ",".join(items))
    return text


def _represent_str(dumper, value):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

# ----------------------------------------------------------------------------
# Templates: Handlebars as Pegasus's handlebars-rust 4.3.7 reads it, without
# HTML escaping, strict wherever a value would become text of the command
# ----------------------------------------------------------------------------

# A small renderer of our own rather than pybars3: Pegasus's dialect differs
# from handlebars.js (raw blocks, `\{{`, whitespace rules, no `{{else if}}`),
# and strictness needs to know whether a name is tested (`{{#if x}}`, where
# an undefined name is simply false) or printed (`{{x}}`, where it is an
# error: think `rm -rf /{{dir}}`). Templates are parsed once per text into
# nested tuples and rendered by a few short functions.

_templates = {}  # template text -> Template; each text is parsed once

_WS = " \t\n\r"  # the whitespace handlebars-rust's grammar skips inside tags
# A name's characters: ASCII letters and digits, `_`, `$`, `-`, and all of
# U+0080 to U+10FFFF. Written as the ASCII it excludes: sre takes 2-4 ms to
# compile a class spanning U+0080-U+10FFFF, at every start (a test checks
# that both spellings agree on every code point).
_NAME_CHAR = r"[^\x00-\x23\x25-\x2c\x2e\x2f\x3a-\x40\x5b-\x5e\x60\x7b-\x7f]"
_SYMBOL = re.compile(_NAME_CHAR + "+")
_PATH_ITEM = r"(?:%s+|\[[^\]]*\])" % _NAME_CHAR
_PATH = re.compile(r"(this[./]|\./)?(@root[./])?(@)?((?:\.\.[./])*)(%s(?:[./]%s)*)"
                   % (_PATH_ITEM, _PATH_ITEM))
_NUMBER = re.compile(r"-?[0-9]+\.?[0-9]*(?:E-?[0-9]+)?")
_STRING_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "/": "/", "\\": "\\"}


class TemplateError(Exception):
    """A template the parser or renderer refuses; render() adds which job."""


class Missing:
    """The value of a name that is not defined: false when tested, an error
    when printed or handed to a helper that needs text."""

    __slots__ = ("path",)

    def __init__(self, path):
        self.path = path


class Path:
    __slots__ = ("text", "root", "local", "up", "parts")

    def __init__(self, text, root, local, up, parts):
        self.text, self.root, self.local, self.up, self.parts = text, root, local, up, parts


class Template:
    """A parsed template: `nodes`, and `tested`, the names whose values
    decide what it renders (in block tags or lookups): check_queue tries
    every value of those, and one value of the others."""

    def __init__(self, nodes):
        self.nodes = nodes
        self.tested = set()
        _collect_tested(nodes, self.tested)


def compile_template(text):
    template = _templates.get(text)
    if template is None:
        template = Template(_Parser(text).parse())
        _templates[text] = template
    return template


def render(text, names, what):
    """Fill in a template; `what` names the job and host for error messages.
    Raises only PegasusError, whatever the template says."""
    if "{{" not in text:
        return text
    try:
        template = compile_template(text)
        out = []
        _render_nodes(template.nodes, _Frame(names, None), out)
        return "".join(out)
    except TemplateError as e:
        raise PegasusError("%s: %s" % (what, e)) from None
    except _Undefined as e:
        raise PegasusError("%s: {{%s}} is not defined (defined here: %s)" % (
            what, e.args[0], ", ".join(sorted(names)) or "nothing")) from None
    except RecursionError:
        raise PegasusError("%s: template nested too deeply" % what) from None


class _Undefined(Exception):
    """A name that is not defined was printed or given to a text helper."""


# --- parsing: text into nodes -------------------------------------------------
#
# Nodes: ("text", str), ("out", call), ("block", call, params_as, body, inverse).
# A call is (name, args, hash): name a helper name or, for `{{x}}`, a Path;
# args are ("lit", value), ("path", Path) or ("sub", call).

class _Parser:
    def __init__(self, text):
        self.text = text
        self.pos = 0

    def fail(self, message, at=None):
        at = self.pos if at is None else at
        line = self.text.count("\n", 0, at) + 1
        raise TemplateError("template error in %r (line %d): %s" % (self.text, line, message))

    def parse(self):
        """The handlebars-rust compile loop: a stack of open blocks, text
        trimmed around standalone tags and `~`."""
        self.stack = [[None, []]]     # [open block tag or None, nodes]
        self.omit_next = False         # the last tag ended with `~`
        self.trim_line = False         # the last tag stood alone on its line
        while True:
            start = self._find_tag()
            if start < 0:
                break
            kind, value, end, omit_before, omit_after = self._tag(start)
            self._tag_done(kind, value, start, end, omit_before, omit_after)
        if len(self.stack) > 1:
            self.fail("{{#%s}} is not closed by {{/%s}}" % ((self.stack[-1][0][0][0],) * 2))
        return self.stack[0][1]

    # Text between tags, with `\{{` escapes undone.
    def _find_tag(self):
        text, pos, chunks = self.text, self.pos, []
        while True:
            found = text.find("{{", pos)
            if found < 0:
                chunks.append(text[pos:])
                self._push_text("".join(chunks), len(text))
                return -1
            slashes = len(text[pos:found]) - len(text[pos:found].rstrip("\\"))
            if slashes == 1:  # \{{ is a literal {{ (and \{{{{ a literal {{{{)
                width = 4 if text.startswith("{{{{", found) else 2
                chunks.append(text[pos:found - 1] + text[found:found + width])
                pos = found + width
                continue
            # \\{{: one backslash goes, and the tag is a tag.
            chunks.append(text[pos:found - 1] if slashes > 1 else text[pos:found])
            self._push_text("".join(chunks), found)
            return found

    def _push_text(self, chunk, end):
        if not chunk:
            return
        whitespace_only = not chunk.strip(_WS)
        if end == len(self.text) and whitespace_only:
            pass  # handlebars-rust keeps trailing blank text as it is
        elif self.omit_next:
            chunk = _rust_trim(chunk, end=False)
        elif self.trim_line:
            chunk = chunk.lstrip(" \t")
            chunk = chunk[2:] if chunk.startswith("\r\n") else chunk[1:] if chunk[:1] == "\n" else chunk
        self.omit_next = self.trim_line = False
        if chunk:
            self.stack[-1][1].append(("text", chunk))

    def _standalone(self, start, end, trim_previous=True):
        """A block tag alone on its line takes the line's indentation and
        newline with it, as in handlebars-rust."""
        after = self.text[end:].lstrip(" \t")
        if not after.startswith(("\n", "\r")):
            return False
        before = self.text[:start].rstrip(" \t")
        alone = not before or before.endswith(("\n", "\r"))
        if alone and trim_previous:
            self._trim_previous(lambda s: s.rstrip(" \t"))
        return alone or start == 0

    def _trim_previous(self, how):
        nodes = self.stack[-1][1]
        if nodes and nodes[-1][0] == "text":
            nodes[-1] = ("text", how(nodes[-1][1]))

    def _tag_done(self, kind, value, start, end, omit_before, omit_after):
        if omit_before:
            self._trim_previous(lambda s: _rust_trim(s, start=False))
        self.omit_next = omit_after
        if kind in ("out", "text"):
            self.stack[-1][1].append((kind, value))
        elif kind == "comment":
            self.trim_line = self._standalone(start, end)
        elif kind == "open":
            self.trim_line = self._standalone(start, end)
            self.stack.append([value, []])
        elif kind == "else":
            self.trim_line = self._standalone(start, end)
            if len(self.stack) < 2 or len(self.stack[-1]) > 2:
                self.fail("{{else}} outside a block", start)
            self.stack[-1].append(self.stack[-1][1])
            self.stack[-1][1] = []
        elif kind == "close":
            self.trim_line = self._standalone(start, end)
            self._close(value, start)
        elif kind == "raw":
            self._close_raw(value, start, end)
        self.pos = end

    def _close(self, name, start):
        if len(self.stack) < 2:
            self.fail("{{/%s}} closes no block" % name, start)
        frame = self.stack.pop()
        call, as_names = frame[0]
        if call[0] != name:
            self.fail("{{#%s}} is closed by {{/%s}}" % (call[0], name), start)
        body, inverse = (frame[2], frame[1]) if len(frame) > 2 else (frame[1], None)
        self.stack[-1][1].append(("block", call, as_names, body, inverse))

    def _close_raw(self, opened, start, end):
        """{{{{raw}}}} ... {{{{/raw}}}}: the text between is not parsed."""
        call, as_names = opened
        self.trim_line = self._standalone(start, end)
        text, pos, chunks = self.text, end, []
        while True:
            found = text.find("{{{{", pos)
            if found < 0:
                self.fail("{{{{%s}}}} is not closed by {{{{/%s}}}}" % (call[0], call[0]), start)
            if text[pos:found].endswith("\\") and not text[pos:found].endswith("\\\\"):
                chunks.append(text[pos:found - 1] + "{{{{")
                pos = found + 4
                continue
            chunks.append(text[pos:found])
            break
        body = "".join(chunks).lstrip(_WS)  # handlebars-rust drops the body's leading blanks
        if self.omit_next:
            body = _rust_trim(body, end=False)
        elif self.trim_line:
            body = body.lstrip(" \t")
            body = body[2:] if body.startswith("\r\n") else body[1:] if body[:1] == "\n" else body
        close = self._raw_close(found)
        if close[0] != call[0]:
            self.fail("{{{{%s}}}} is closed by {{{{/%s}}}}" % (call[0], close[0]), found)
        if close[1]:
            body = _rust_trim(body, start=False)
        self.omit_next = close[2]
        # The closing tag alone on its line: as _standalone(), for the body.
        self.trim_line = False
        if self.text[self.pos:].lstrip(" \t").startswith(("\n", "\r")):
            before = self.text[:found].rstrip(" \t")
            alone = not before or before.endswith(("\n", "\r"))
            body = body.rstrip(" \t") if alone else body
            self.trim_line = alone or found == 0
        nodes = [("text", body)] if body else []
        self.stack[-1][1].append(("block", call, as_names, nodes, None))
        self._end_raw = self.pos

    def _raw_close(self, start):
        self.pos = start + 4
        omit_before = self._eat("~")
        if not self._eat("/"):
            self.fail("{{{{ inside a raw block must close it", start)
        name = self._identifier()
        self._skip()
        omit_after = self._eat("~")
        self._expect("}}}}")
        return name, omit_before, omit_after

    # One tag, from `{{` to `}}`.
    def _tag(self, start):
        text = self.text
        if text.startswith("{{!--", start):
            end = text.find("--}}", start + 5)
            if end >= 0:
                return "comment", None, end + 4, False, False
        if text.startswith("{{!", start):
            end = text.find("}}", start + 3)
            if end < 0:
                self.fail("'{{' is never closed", start)
            return "comment", None, end + 2, False, False
        if text.startswith("{{{{", start):
            self.pos = start + 4
            omit_before = self._eat("~")
            if text.startswith("/", self.pos):
                self.fail("{{{{/...}}}} closes no raw block", start)
            call, as_names = self._exp_line()
            omit_after = self._eat("~")
            self._expect("}}}}")
            if omit_before:
                self._trim_previous(lambda s: _rust_trim(s, start=False))
            self.omit_next = omit_after
            self._close_raw((call, as_names), start, self.pos)
            return "none", None, self._end_raw, False, self.omit_next
        self.pos = start + 2
        triple = self._eat("{")
        omit_before = self._eat("~")
        if not triple:
            triple = self._eat("{")
        sigil = text[self.pos:self.pos + 1]
        if not triple and sigil in ("#", "/", "&", "^", ">", "*"):
            self.pos += 1
        else:
            sigil = ""
        self._skip()
        if not triple and sigil in ("^", "") and self._invert_tag(sigil):
            kind, value = "else", None
        elif sigil in (">", "*") or sigil == "#" and text[self.pos:self.pos + 1] in (">", "*"):
            self.fail("partials and decorators are not supported (Pegasus has none)", start)
        elif sigil == "#":
            kind, value = "open", self._exp_line()
        elif sigil == "/":
            kind, value = "close", self._identifier()
        else:
            kind, value = "out", self._expression(start, sigil == "&")
        self._skip()
        omit_after = self._eat("~")
        self._expect("}}}" if triple else "}}", start)
        return kind, value, self.pos, omit_before, omit_after

    def _invert_tag(self, sigil):
        """{{else}} or {{^}}; handlebars-rust 4.3.7 has no {{else if}}."""
        if sigil == "":
            match = re.compile(r"else(?!%s)" % _NAME_CHAR).match(self.text, self.pos)
            if match is None:
                return False
            self.pos = match.end()
        self._skip()
        if not self.text.startswith(("}}", "~}}"), self.pos):
            if sigil == "^":
                self.fail("{{^name}} is not Handlebars as Pegasus reads it; "
                          "write {{#unless name}}")
            self.fail("{{else if ...}} is not supported by Pegasus's Handlebars; "
                      "nest an {{#if}} inside {{else}}")
        return True

    def _expression(self, start, name_only):
        if self.text.startswith("(", self.pos):
            head = ("sub", self._subexpression())
        else:
            head = ("path", self._path())
        self._skip()
        if name_only or self.text.startswith(("}", "~"), self.pos):
            return head[1] if head[0] == "sub" else (head[1], [], {})
        path = head[1] if head[0] == "path" else None
        if path is None or _SYMBOL.fullmatch(path.text) is None:
            self.fail("%r cannot be called as a helper" % self.text[start:self.pos].strip("{ "))
        args, hash_, as_names = self._arguments()
        if as_names:
            self.fail("'as |...|' belongs in a block tag ({{#each x as |item|}})")
        return path.text, args, hash_

    def _exp_line(self):
        self._skip()
        name = self._identifier()
        args, hash_, as_names = self._arguments()
        return (name, args, hash_), as_names

    def _arguments(self):
        args, hash_, as_names = [], {}, None
        while True:
            self._skip()
            match = re.compile(r"as[ \t\n\r]*\|").match(self.text, self.pos)
            if match:
                self.pos = match.end()
                as_names = self._block_params()
                self._skip()
                return args, hash_, as_names
            match = re.compile(r"(%s+)[ \t\n\r]*=" % _NAME_CHAR).match(self.text, self.pos)
            if match:
                self.pos = match.end()
                self._skip()
                hash_[match.group(1)] = self._param()
                continue
            if self.text.startswith(("}", "~", ")"), self.pos) or self.pos >= len(self.text):
                return args, hash_, as_names
            args.append(self._param())

    def _block_params(self):
        names = []
        while True:
            self._skip()
            if self._eat("|"):
                if not 1 <= len(names) <= 2:
                    self.fail("'as |...|' names one or two block parameters")
                return names
            names.append(self._identifier())

    def _param(self):
        text, pos = self.text, self.pos
        c = text[pos:pos + 1]
        if c in ('"', "'"):
            return ("lit", self._string())
        if c == "(":
            return ("sub", self._subexpression())
        if c in ("[", "{"):
            return ("lit", self._literal())
        for word, value in (("true", True), ("false", False), ("null", None)):
            if text.startswith(word, pos) and not _SYMBOL.match(text, pos + len(word)):
                self.pos = pos + len(word)
                return ("lit", value)
        match = _NUMBER.match(text, pos)
        if match and not _SYMBOL.match(text, match.end()):
            self.pos = match.end()
            number = match.group()
            return ("lit", float(number) if "." in number or "E" in number else int(number))
        if re.compile(r"(as|else)(?!%s)" % _NAME_CHAR).match(text, pos):
            self.fail("unexpected %r" % text[pos:pos + 4])
        return ("path", self._path())

    def _literal(self):
        """A JSON-like array or object literal, as the Rust grammar allows."""
        self._skip()
        if self._eat("["):
            items = []
            while not self._eat_after_space("]"):
                if items:
                    self._expect(",")
                self._skip()
                items.append(self._param_value())
            return items
        self._expect("{")
        obj = {}
        while not self._eat_after_space("}"):
            if obj:
                self._expect(",")
            self._skip()
            key = self._string()
            self._skip()
            self._expect(":")
            self._skip()
            obj[key] = self._param_value()
        return obj

    def _param_value(self):
        kind, value = self._param()
        if kind != "lit":
            self.fail("only literals can go in a [...] or {...} literal")
        return value

    def _string(self):
        quote = self.text[self.pos]
        out, pos = [], self.pos + 1
        while pos < len(self.text):
            c = self.text[pos]
            if c == quote:
                self.pos = pos + 1
                return "".join(out)
            if c == "\\":
                code = self.text[pos + 1:pos + 2]
                if code == quote or code in _STRING_ESCAPES:
                    out.append(_STRING_ESCAPES.get(code, code))
                    pos += 2
                    continue
                hex_digits = self.text[pos + 2:pos + 6]
                if code == "u" and re.fullmatch(r"[0-9A-Fa-f]{4}", hex_digits):
                    out.append(chr(int(hex_digits, 16)))
                    pos += 6
                    continue
                self.fail("bad escape in a string literal", pos)
            out.append(c)
            pos += 1
        self.fail("a string literal is never closed")

    def _subexpression(self):
        start = self.pos
        self._expect("(")
        self._skip()
        path = self._path()
        args, hash_, as_names = self._arguments()
        self._skip()
        self._expect(")")
        if not args and not hash_:
            return (path, [], {})
        if as_names or _SYMBOL.fullmatch(path.text) is None:
            self.fail("bad subexpression %r" % self.text[start:self.pos])
        return (path.text, args, hash_)

    def _path(self):
        match = _PATH.match(self.text, self.pos)
        if match is None:
            self.fail("expected a name, found %r" % self.text[self.pos:self.pos + 10])
        self.pos = match.end()
        parts = [p[1:-1] if p.startswith("[") else p
                 for p in re.findall(r"\[[^\]]*\]|[^./\[]+", match.group(5))]
        parts = [p for p in parts if p != "this"]  # `this` means here, as in Rust
        return Path(match.group(), bool(match.group(2)), bool(match.group(3)),
                    match.group(4).count(".."), parts)

    def _identifier(self):
        self._skip()
        match = _SYMBOL.match(self.text, self.pos)
        if match is None:
            self.fail("expected a helper name, found %r" % self.text[self.pos:self.pos + 10])
        self.pos = match.end()
        return match.group()

    def _skip(self):
        while self.pos < len(self.text) and self.text[self.pos] in _WS:
            self.pos += 1

    def _eat(self, token):
        if self.text.startswith(token, self.pos):
            self.pos += len(token)
            return True
        return False

    def _eat_after_space(self, token):
        self._skip()
        return self._eat(token)

    def _expect(self, token, start=None):
        if not self._eat(token):
            if self.pos >= len(self.text) or start is not None and "}}" not in self.text[start:]:
                self.fail("'{{' is never closed", start)
            self.fail("expected %r, found %r" % (token, self.text[self.pos:self.pos + 10]))


# --- text helpers ------------------------------------------------------------

# Text helpers: handlebars_misc_helpers 0.13.0's string group, byte for byte.
# Pegasus names result directories with these, so a sweep continued under
# pegasus.py must get the same names. They follow the Rust code behind them:
# std's case mapping and trimming, Inflector 0.11.4 (quirks and all: `person`
# pluralizes to `personople`, a byte offset is used as a character index) and
# enquote 1.1.0. Rust's character classes are Unicode properties; the nearest
# Python tests are used, which agree on every letter, digit and mark we know
# to be in use (see README).

_RUST_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
                        "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def _rust_trim(text, start=True, end=True):
    # Rust's trim is Unicode White_Space, which, unlike str.isspace, leaves U+001C..U+001F.
    i, j = 0, len(text)
    while start and i < j and text[i] in _RUST_SPACE:
        i += 1
    while end and j > i and text[j - 1] in _RUST_SPACE:
        j -= 1
    return text[i:j]


def _alphabetic(c):
    """Rust's char::is_alphabetic: letters, letter numbers, and the marks and
    symbols Unicode calls Other_Alphabetic (vowel signs, circled letters)."""
    if c.isalpha():
        return True
    if c < "\x80":
        return False
    category = unicodedata.category(c)
    if category == "Nl":
        return True
    if category == "Mc":
        return "TONE MARK" not in unicodedata.name(c, "")
    if category == "Mn":
        code = ord(c)
        if (0x5b0 <= code <= 0x5c7 and code not in (0x5be, 0x5c0, 0x5c3, 0x5c6)
                or 0x610 <= code <= 0x61a or 0x64b <= code <= 0x657
                or 0x659 <= code <= 0x65f or 0x6d6 <= code <= 0x6ed and code not in
                (0x6dd, 0x6de, 0x6df, 0x6e0, 0x6e5, 0x6e6, 0x6e9, 0x6ea, 0x6eb, 0x6ec)
                or code in (0x345, 0x670)):
            return True
        name = unicodedata.name(c, "")
        return any(word in name for word in _ALPHABETIC_MARKS)
    code = ord(c)
    return (0x24b6 <= code <= 0x24e9 or 0x1f130 <= code <= 0x1f189
            and code not in range(0x1f14a, 0x1f150) and code not in range(0x1f16a, 0x1f170))


_ALPHABETIC_MARKS = ("VOWEL SIGN", "ANUSVARA", "CANDRABINDU", "VISARGA", "LENGTH MARK",
                     "NIKAHIT", "NIKHAHIT", "PHINTHU", "MAI HAN-AKAT", "SARA ")


def _numeric(c):
    # Rust's char::is_numeric is the N* categories; str.isnumeric also takes 一 (Lo).
    return c.isdigit() if c < "\x80" else unicodedata.category(c) in ("Nd", "Nl", "No")


def _alnum(c):
    return _alphabetic(c) or _numeric(c)


def _rust_word(c):
    """Rust regex's \\w: Alphabetic, marks, decimal digits, connector punctuation, ZWJ/ZWNJ."""
    if c < "\x80":
        return c.isalnum() or c == "_"
    return (_alphabetic(c) or c in "\u200c\u200d"
            or unicodedata.category(c) in ("Mn", "Mc", "Me", "Nd", "Pc"))


def _ascii_lower(c):
    return c.lower() if "A" <= c <= "Z" else c


def _ascii_upper(c):
    return c.upper() if "a" <= c <= "z" else c


def _trim_separators(text):
    end = len(text)
    while end and not _alnum(text[end - 1]):
        end -= 1
    return text[:end]


def _snake_like(text, separator, upper):
    """Inflector's to_case_snake_like: snake, kebab and screaming snake case."""
    chars = list(text)
    case = _ascii_upper if upper else _ascii_lower
    out, first, offset = [], True, 0
    for c in _trim_separators(text):
        index, offset = offset, offset + len(c.encode("utf-8"))
        if not _alnum(c):
            if not first:
                first = True
                out.append(separator)
            continue
        # Inflector reads its neighbours at a *byte* offset as if it were a
        # character index, and calls anything but a-z upper case.
        if (not first and not "a" <= c <= "z"
                and (index + 1 < len(chars) and chars[index + 1].islower()
                     or index - 1 < len(chars) and chars[index - 1].islower())):
            out.append(separator)
        first = False
        out.append(case(c))
    return "".join(out)


def _camel_like(text, new_word, first_word, separator, inverted):
    """Inflector's to_case_camel_like: camel, pascal, class, title, train and sentence case."""
    out, found, last = [], False, " "
    for c in _trim_separators(text):
        alnum = _alnum(c)
        if not alnum and found:
            new_word = True
        elif not alnum:
            continue
        elif _numeric(c):
            found = new_word = True
            out.append(c)
        elif new_word or (last.islower() and c.isupper()):
            found, new_word = True, False
            if separator and not first_word:
                out.append(separator)
            out.append(_ascii_upper(c) if first_word or not inverted else _ascii_lower(c))
            first_word = False
        else:
            found, last = True, c
            out.append(_ascii_lower(c))
    return "".join(out)


def _class_case(text):
    pascal = _camel_like(text, True, False, "", False)
    cut = max((i for i, c in enumerate(pascal) if c.isupper()), default=0)
    return pascal[:cut] + _singular(pascal[cut:])


def _table_case(text):
    snake = _snake_like(text, "_", False)
    cut = max(snake.rfind("_"), 0)
    return snake[:cut] + _plural(snake[cut:])


_UNCOUNTABLE = frozenset("""
accommodation adulthood advertising advice aggression aid air aircraft alcohol anger applause
arithmetic assistance athletics bacon baggage beef biology blood botany bread butter carbon
cardboard cash chalk chaos chess crossroads countryside dancing deer dignity dirt dust economics
education electricity engineering enjoyment envy equipment ethics evidence evolution fame fiction
flour flu food fuel fun furniture gallows garbage garlic genetics gold golf gossip grammar
gratitude grief guilt gymnastics happiness hardware harm hate hatred health heat help homework
honesty honey hospitality housework humour hunger hydrogen ice importance inflation information
innocence iron irony jam jewelry judo karate knowledge lack laughter lava leather leisure
lightning linguine linguini linguistics literature litter livestock logic loneliness luck luggage
macaroni machinery magic management mankind marble mathematics mayonnaise measles methane milk
money mud music mumps nature news nitrogen nonsense nurture nutrition obedience obesity oxygen
pasta patience physics poetry pollution poverty pride psychology publicity punctuation quartz
racism relaxation reliability research respect revenge rice rubbish rum safety scenery seafood
seaside series shame sheep shopping sleep smoke smoking snow soap software soil spaghetti species
steam stuff stupidity sunshine symmetry tennis thirst thunder timber traffic transportation trust
underwear unemployment unity validity veal vegetation vegetarianism vengeance violence vitality
warmth wealth weather welfare wheat wildlife wisdom yoga zinc zoology""".split())

# Inflector's rules, tried last to first; the first that matches wins. `$`
# is Rust's end of text (\Z here); \w is Rust's Unicode \w, see _inflect().
# Kept as text: re compiles (and caches) a pattern when a template first
# needs it, rather than fifty of them at every start.
_PLURAL_RULES = [(p.replace("$", r"\Z"), r) for p, r in (
    (r"(\w*)s$", "s"),
    (r"(\w*([^aeiou]ese))$", ""),
    (r"(\w*(ax|test))is$", "es"),
    (r"(\w*(alias|[^aou]us|tlas|gas|ris))$", "es"),
    (r"(\w*(e[mn]u))s?$", "s"),
    (r"(\w*([^l]ias|[aeiou]las|[emjzr]as|[iu]am))$", ""),
    (r"(\w*(alumn|syllab|octop|vir|radi|nucle|fung|cact|stimul|termin|bacill|foc|uter|loc"
     r"|strat))(?:us|i)$", "i"),
    (r"(\w*(alumn|alg|vertebr))(?:a|ae)$", "ae"),
    (r"(\w*(seraph|cherub))(?:im)?$", "im"),
    (r"(\w*(her|at|gr))o$", "oes"),
    (r"(\w*(agend|addend|millenni|dat|extrem|bacteri|desiderat|strat|candelabr|errat|ov"
     r"|symposi|curricul|automat|quor))(?:a|um)$", "a"),
    (r"(\w*(apheli|hyperbat|periheli|asyndet|noumen|phenomen|criteri|organ|prolegomen|hedr"
     r"|automat))(?:a|on)$", "a"),
    (r"(\w*)sis$", "ses"),
    (r"(\w*(kni|wi|li))fe$", "ves"),
    (r"(\w*(ar|l|ea|eo|oa|hoo))f$", "ves"),
    (r"(\w*([^aeiouy]|qu))y$", "ies"),
    (r"(\w*([^ch][ieo][ln]))ey$", "ies"),
    (r"(\w*(x|ch|ss|sh|zz)es)$", ""),
    (r"(\w*(x|ch|ss|sh|zz))$", "es"),
    (r"(\w*(matr|cod|mur|sil|vert|ind|append))(?:ix|ex)$", "ices"),
    (r"(\w*(m|l)(?:ice|ouse))$", "ice"),
    (r"(\w*(pe)(?:rson|ople))$", "ople"),
    (r"(\w*(child))(?:ren)?$", "ren"),
    (r"(\w*eaux)$", ""),
)][::-1]

_SINGULAR_RULES = [(p.replace("$", r"\Z"), r) for p, r in (
    (r"(\w*)s$", ""),
    (r"(\w*)(ss)$", "$2"),
    (r"(n)ews$", "ews"),
    (r"(\w*)(o)es$", ""),
    (r"(\w*)([ti])a$", "um"),
    (r"((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)(sis|ses)$", "sis"),
    (r"(^analy)(sis|ses)$", "sis"),
    (r"(\w*)([^f])ves$", "fe"),
    (r"(\w*)(hive)s$", ""),
    (r"(\w*)(tive)s$", ""),
    (r"(\w*)([lr])ves$", "f"),
    (r"(\w*([^aeiouy]|qu))ies$", "y"),
    (r"(s)eries$", "eries"),
    (r"(m)ovies$", "ovie"),
    (r"(\w*)(x|ch|ss|sh)es$", "$2"),
    (r"(m|l)ice$", "ouse"),
    (r"(bus)(es)?$", ""),
    (r"(shoe)s$", ""),
    (r"(cris|test)(is|es)$", "is"),
    (r"^(a)x[ie]s$", "xis"),
    (r"(octop|vir)(us|i)$", "us"),
    (r"(alias|status)(es)?$", ""),
    (r"^(ox)en", ""),
    (r"(vert|ind)ices$", "ex"),
    (r"(matr)ices$", "ix"),
    (r"(quiz)zes$", ""),
    (r"(database)s$", ""),
)][::-1]

_PLURAL_WORDS = {"ox": "oxen", "man": "men", "woman": "women", "die": "dice", "yes": "yeses",
                 "foot": "feet", "eave": "eaves", "goose": "geese", "tooth": "teeth",
                 "quiz": "quizzes"}
_SINGULAR_WORDS = dict((p, s) for s, p in _PLURAL_WORDS.items())
_SINGULAR_WORDS["boxes"] = "box"


def _inflect(rules, text):
    """The first rule that matches, and its match. Python's \\w is not Rust's
    (marks, for one), so the rules run on a stand-in of the same length: ASCII
    as it is, other characters as one word or one non-word character."""
    masked = "".join(c if c < "\x80" else "\u00e9" if _rust_word(c) else "\u2022"
                     for c in text)
    for rule, replacement in rules:
        match = re.search(rule, masked)
        if match:
            return match, replacement
    return None, None


def _plural(text):
    if text in _UNCOUNTABLE:
        return text
    if text in _PLURAL_WORDS:
        return _PLURAL_WORDS[text]
    match, replacement = _inflect(_PLURAL_RULES, text)
    if match is None:
        return text + "s"
    return text[match.start(1):match.end(1)] + replacement


def _singular(text):
    if text in _UNCOUNTABLE:
        return text
    if text in _SINGULAR_WORDS:
        return _SINGULAR_WORDS[text]
    match, replacement = _inflect(_SINGULAR_RULES, text)
    if match is None:
        return text
    group = lambda n: text[match.start(n):match.end(n)] if match.start(n) >= 0 else ""
    return _expand(group(1) + replacement, group, match.re.groups)


def _expand(template, group, count):
    """The Rust regex crate's Captures::expand: $2 and ${2} are groups, $$ is $."""
    out, i = [], 0
    while i < len(template):
        c = template[i]
        i += 1
        if c != "$":
            out.append(c)
            continue
        if template[i:i + 1] == "$":
            out.append("$")
            i += 1
            continue
        if template[i:i + 1] == "{":
            end = template.find("}", i)
            name, after = (template[i + 1:end], end + 1) if end > i + 1 else ("", i)
        else:
            name = re.match(r"[_0-9A-Za-z]*", template[i:]).group()
            after = i + len(name)
        if not name:
            out.append("$")
            continue
        i = after
        if name.isdigit() and int(name) <= count:  # named groups: these rules have none
            out.append(group(int(name)))
    return "".join(out)


def _enquote(symbol, text):
    quote = symbol[:1] or '"'
    return quote + "".join("\\" + c if c == quote or c == "\\" else c for c in text) + quote


def _unquote(text):
    """enquote::unquote; anything it cannot unquote comes back unchanged, as
    handlebars_misc_helpers does."""
    if len(text) < 2 or text[0] not in "\"'`" or text[-1] != text[0]:
        return text
    result = _unescape(text[1:-1], text[0])
    return text if result is None else result


_ESCAPES = {"a": "\x07", "b": "\x08", "f": "\x0c", "n": "\n", "r": "\r", "t": "\t",
            "v": "\x0b", "\\": "\\", '"': '"', "'": "'", "`": "`"}


def _unescape(text, quote):
    out, i = [], 0
    while i < len(text):
        c = text[i]
        i += 1
        if c == quote:
            return None
        if c != "\\":
            out.append(c)
            continue
        if i == len(text):
            return None
        code = text[i]
        i += 1
        if code in _ESCAPES:
            out.append(_ESCAPES[code])
            continue
        # Fixed-width numbers, padded with NULs past the end (never digits).
        width, base, limit = {"x": (2, 16, 0xff), "u": (4, 16, 0x10ffff),
                              "U": (8, 16, 0x10ffff)}.get(code, (3, 8, 0xff))
        if code in "xuU":
            digits, i = text[i:i + width].ljust(width, "\0"), i + width
        elif "0" <= code <= "9":
            digits, i = (code + text[i:i + 2]).ljust(3, "\0"), i + 2
        else:
            return None
        value = _rust_uint(digits, base)
        if value is None or value > limit or 0xd800 <= value <= 0xdfff:
            return None
        out.append(chr(value))
    return "".join(out)


_OCTAL = frozenset("01234567")
_HEX = frozenset("0123456789abcdefABCDEF")


def _rust_uint(text, base):
    """Rust's from_str_radix for an unsigned type: an optional '+', then digits only."""
    digits = text[1:] if text[:1] == "+" else text
    valid = _OCTAL if base == 8 else _HEX
    if not digits or any(d not in valid for d in digits):
        return None
    return int(digits, base)


# --- rendering -----------------------------------------------------------------

class _Frame:
    """One level of context: the value `this` is, @index and friends, and the
    names an `as |x i|` gave."""

    __slots__ = ("base", "parent", "local", "params")

    def __init__(self, base, parent, local=None, params=None):
        self.base, self.parent, self.local, self.params = base, parent, local, params


def _render_nodes(nodes, frame, out):
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "out":
            value = _call(node[1], frame)
            if isinstance(value, Missing):
                raise _Undefined(value.path)
            out.append(_json_text(value))
        else:
            _render_block(node, frame, out)


def _call(call, frame):
    """The value of `{{x}}`, `{{helper a b}}` or `(helper a b)`."""
    name, args, hash_ = call
    if isinstance(name, Path):
        if not (name.text in HELPERS or name.text in _BLOCK_HELPERS) or name.parts != [name.text]:
            return _resolve(name, frame)
        name = name.text
    if name in _BLOCK_HELPERS:
        raise TemplateError("'%s' is a block helper: write {{#%s ...}}...{{/%s}}"
                            % (name, name, name))
    helper = HELPERS.get(name)
    if helper is None:
        raise TemplateError("unknown helper '%s'" % name)
    function, least, most = helper
    if not least <= len(args) <= (most if most is not None else len(args)):
        wanted = "%d" % least if least == most else "%d or more" % least
        raise TemplateError("helper '%s' takes %s argument%s, got %d"
                            % (name, wanted, "" if wanted == "1" else "s", len(args)))
    values = [_eval(arg, frame) for arg in args]
    if name == "lookup":
        return _lookup(values, " ".join(_arg_text(arg) for arg in args))
    return function(name, values, args)


def _eval(arg, frame):
    kind, value = arg
    if kind == "lit":
        return value
    if kind == "path":
        return _resolve(value, frame)
    return _call(value, frame)


def _arg_text(arg):
    kind, value = arg
    if kind == "lit":
        return json.dumps(value)
    return value.text if kind == "path" else "(%s)" % (value[0] if isinstance(value[0], str)
                                                      else value[0].text)


def _resolve(path, frame):
    if path.root:
        while frame.parent is not None:
            frame = frame.parent
    for _ in range(path.up):
        frame = frame.parent or frame
    parts = path.parts
    if path.local:
        value = (frame.local or {}).get(parts[0], _MISSING) if parts else _MISSING
        parts = parts[1:]
    else:
        value = frame.base
        block = frame
        while parts and block is not None:
            if block.params and parts[0] in block.params:
                value, parts = block.params[parts[0]], parts[1:]
                break
            block = block.parent
    for part in parts:
        if isinstance(value, dict):
            value = value.get(part, _MISSING)
        elif isinstance(value, list) and part.isdigit() and part.isascii() \
                and int(part) < len(value):
            value = value[int(part)]
        else:
            value = _MISSING
        if value is _MISSING:
            break
    return Missing(path.text) if value is _MISSING or isinstance(value, Missing) else value


_MISSING = object()


def _truthy(value, include_zero=False):
    """Handlebars' test: false, 0, "", [], {}, null and undefined are false."""
    if isinstance(value, (Missing, type(None))):
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        if include_zero:
            return value == value
        return value != 0 and abs(value) >= 2.2250738585072014e-308 and abs(value) != float("inf")
    return len(value) > 0


def _json_text(value):
    """A value as handlebars-rust prints it."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[%s]" % "".join(_json_text(item) + ", " for item in value)
    return "[object]"


def _render_block(node, frame, out):
    _, (name, args, hash_), as_names, body, inverse = node
    block = _BLOCK_HELPERS.get(name)
    if block is None:
        if name in HELPERS:
            raise TemplateError("'%s' is not a block helper: write {{%s ...}}" % (name, name))
        raise TemplateError("unknown block helper '%s'" % name)
    wanted = 0 if name == "raw" else 1
    if len(args) != wanted:
        raise TemplateError("{{#%s}} takes %s, got %d" % (
            name, "no arguments" if not wanted else "one value", len(args)))
    values = [_eval(arg, frame) for arg in args]
    include_zero = _truthy(_eval(hash_["includeZero"], frame)) if "includeZero" in hash_ else False
    block(values, args, as_names, body, inverse, frame, out, include_zero)


def _block_if(values, args, as_names, body, inverse, frame, out, include_zero):
    chosen = body if _truthy(values[0], include_zero) else inverse
    _render_nodes(chosen or (), frame, out)


def _block_unless(values, args, as_names, body, inverse, frame, out, include_zero):
    chosen = inverse if _truthy(values[0], include_zero) else body
    _render_nodes(chosen or (), frame, out)


def _block_with(values, args, as_names, body, inverse, frame, out, include_zero):
    value = values[0]
    if not _truthy(value):
        _render_nodes(inverse or (), frame, out)
        return
    params = {as_names[0]: value} if as_names else None
    _render_nodes(body, _Frame(value, frame, None, params), out)


def _block_each(values, args, as_names, body, inverse, frame, out, include_zero):
    value = values[0]
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    elif inverse is not None or not _truthy(value):
        _render_nodes(inverse or (), frame, out)
        return
    else:  # Handlebars would print nothing, which is never what was meant
        raise TemplateError("{{#each %s}}: %r is not a list, so there is nothing to go through"
                            % (args[0][1].text if args[0][0] == "path" else "...", value))
    if not items:
        _render_nodes(inverse or (), frame, out)
        return
    for number, (key, item) in enumerate(items):
        local = {"index": number, "key": key, "first": number == 0,
                 "last": number == len(items) - 1}
        if isinstance(value, list):
            del local["key"]
        params = dict(zip(as_names or (), (item, key)))
        _render_nodes(body, _Frame(item, frame, local, params), out)


def _block_raw(values, args, as_names, body, inverse, frame, out, include_zero):
    _render_nodes(body, frame, out)


_BLOCK_HELPERS = {"if": _block_if, "unless": _block_unless, "with": _block_with,
                  "each": _block_each, "raw": _block_raw}


def _lookup(values, text):
    collection, key = values
    if isinstance(collection, list) and isinstance(key, int) and not isinstance(key, bool) \
            and 0 <= key < len(collection):
        return collection[key]
    if isinstance(collection, dict) and isinstance(key, str) and key in collection:
        return collection[key]
    return Missing("lookup " + text)


def _text(name, value, arg):
    """A text helper's argument: text, or an error naming what it got."""
    if isinstance(value, str):
        return value
    if isinstance(value, Missing):
        raise _Undefined(value.path)
    kind = ("a boolean" if isinstance(value, bool) else "a number"
            if isinstance(value, (int, float)) else "null" if value is None
            else "a list" if isinstance(value, list) else "an object")
    raise TemplateError("helper '%s' needs text, but %s is %s" % (name, _arg_text(arg), kind))


def _text_helper(function):
    def helper(name, values, args):
        return function(*[_text(name, v, a) for v, a in zip(values, args)])
    return helper


def _number(value):
    try:
        return float(_json_text(value))
    except ValueError:
        return None


def _compare(op):
    def compare(name, values, args):
        for value in values:
            if isinstance(value, Missing):
                raise _Undefined(value.path)
        x, y = _number(values[0]), _number(values[1])
        if x is None or y is None:  # numbers compare as numbers, the rest as text
            x, y = _json_text(values[0]), _json_text(values[1])
        return op(x, y)
    return compare


def _same(a, b):
    """eq: undefined and null equal each other only; the rest compare as text."""
    if isinstance(a, Missing) or a is None or isinstance(b, Missing) or b is None:
        return (isinstance(a, Missing) or a is None) and (isinstance(b, Missing) or b is None)
    return _json_text(a) == _json_text(b)


def _length(value):
    return len(value) if isinstance(value, (str, list, dict)) else 0


def _first_non_empty(name, values, args):
    return next((v for v in values if isinstance(v, str) and v), "")


_STRING_HELPERS = {
    "to_lower_case": lambda s: s.lower(),
    "to_upper_case": lambda s: s.upper(),
    "trim": _rust_trim,
    "trim_start": lambda s: _rust_trim(s, end=False),
    "trim_end": lambda s: _rust_trim(s, start=False),
    "to_camel_case": lambda s: _camel_like(s, False, False, "", False),
    "to_pascal_case": lambda s: _camel_like(s, True, False, "", False),
    "to_snake_case": lambda s: _snake_like(s, "_", False),
    "to_screaming_snake_case": lambda s: _snake_like(s, "_", True),
    "to_kebab_case": lambda s: _snake_like(s, "-", False),
    "to_train_case": lambda s: _camel_like(s, True, True, "-", False),
    "to_sentence_case": lambda s: _camel_like(s, True, True, " ", True),
    "to_title_case": lambda s: _camel_like(s, True, True, " ", False),
    "to_class_case": _class_case,
    "to_table_case": _table_case,
    "to_plural": _plural,
    "to_singular": _singular,
    "unquote": _unquote,
}

# name -> (function(name, values, args), fewest arguments, most or None)
HELPERS = {name: (_text_helper(f), 1, 1) for name, f in _STRING_HELPERS.items()}
HELPERS.update({
    "replace": (_text_helper(lambda s, old, new: s.replace(old, new)), 3, 3),
    "quote": (_text_helper(_enquote), 2, 2),
    "first_non_empty": (_first_non_empty, 0, None),
    # Handlebars' own helpers.
    "lookup": (None, 2, 2),
    "log": (lambda name, values, args: "", 0, None),
    "len": (lambda name, values, args: _length(values[0]), 1, 1),
    "eq": (lambda name, values, args: _same(*values), 2, 2),
    "ne": (lambda name, values, args: not _same(*values), 2, 2),
    "gt": (_compare(lambda a, b: a > b), 2, 2),
    "gte": (_compare(lambda a, b: a >= b), 2, 2),
    "lt": (_compare(lambda a, b: a < b), 2, 2),
    "lte": (_compare(lambda a, b: a <= b), 2, 2),
    "and": (lambda name, values, args: all(_truthy(v) for v in values), 2, None),
    "or": (lambda name, values, args: any(_truthy(v) for v in values), 2, None),
    "not": (lambda name, values, args: not _truthy(values[0]), 1, 1),
})


def _collect_tested(nodes, tested):
    """Names in block tags and lookups: their values steer what renders."""
    for node in nodes:
        if node[0] == "block":
            _names_in(node[1], tested, False)
            _collect_tested(node[3], tested)
            _collect_tested(node[4] or (), tested)
        elif node[0] == "out":
            _names_in(node[1], tested, True)


def _names_in(call, tested, only_lookups):
    name, args, hash_ = call
    if name == "lookup":
        only_lookups = False
    for kind, value in list(args) + list(hash_.values()):
        if kind == "path" and not only_lookups and value.parts and not value.local:
            tested.add(value.parts[0])
        elif kind == "sub":
            _names_in(value, tested, only_lookups)


def job_names(job, slot, indices):
    """A job's template variables on a slot: host parameters and hostname win;
    {{slots}} is the slot numbers it holds, ready for CUDA_VISIBLE_DEVICES."""
    names = dict(job.params)
    names.update(slot.params)
    names["hostname"] = slot.hostname
    names["slots"] = ",".join(map(str, indices))
    return names


def render_job(job, slot, indices=None):
    """Render a job for a slot; without `indices` (checks, dry run), as if it
    held the first slot numbers it needs."""
    if indices is None:
        indices = range(job.slots)
    what = "job %r on %s" % (job.command, slot.label)
    command = render(job.command, job_names(job, slot, indices), what)
    if "\0" in command:  # no argv, no shell variable can hold it
        raise PegasusError("%s: a command cannot contain a NUL byte (\\0)" % what)
    return command


# ----------------------------------------------------------------------------
# Queue file: a YAML list edited in place, guarded by a sidecar lock file
# ----------------------------------------------------------------------------


class QueueLock:
    """An flock on queue.yaml.lock, shared by the runner, lock mode and add.

    A sidecar, not the queue file: editors and pegasus save by renaming a new
    file over the old one, and a lock on a replaced inode guards nothing.
    flock, not lockf: a lockf lock vanishes when *any* descriptor of the file
    in this process closes. The kernel drops it when its holder dies, so a
    crashed runner never blocks anyone. The holder writes who it is into the
    file so that whoever waits can say, and removes the file on release (the
    Rust pegasus takes a lock file that exists as held). So a waiter may lock
    a file that was just unlinked: after flock it checks that the path still
    names the file it locked, and else starts again on the new one.
    """

    def __init__(self, queue_path, mode):
        self.path = queue_path + ".lock"
        self.mode = mode
        self.fd = None
        self.held = False

    def try_acquire(self):
        while True:
            if self.fd is None:
                try:
                    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                except OSError as e:
                    raise PegasusError("%s: cannot open the lock file: %s"
                                       % (self.path, e.strerror)) from None
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            if self.names_ours():
                break
            self.close()  # unlinked or replaced by its last holder: lock the new one
        self.held = True
        self.describe("")
        return True

    def names_ours(self):
        try:
            path, ours = os.stat(self.path), os.fstat(self.fd)
        except FileNotFoundError:
            return False
        return (path.st_dev, path.st_ino) == (ours.st_dev, ours.st_ino)

    def describe(self, extra):
        """Say who holds the lock; best effort: a full disk must not stop us."""
        text = "pid %d, pegasus %s%s, since %s\n" % (
            os.getpid(), self.mode, extra, datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"))
        data = text.encode()
        try:
            # Write, then cut to length: ext4 flushes a file truncated to
            # zero when it is closed (auto_da_alloc), and freeing those
            # blocks at unlink cost ~1 ms a take where discard is on.
            os.pwrite(self.fd, data, 0)
            os.ftruncate(self.fd, len(data))
        except OSError:
            pass

    def release(self):
        if self.held:
            # Unlink while still holding it, and only our own file: whoever
            # waits on this inode then sees it is gone and opens a new one.
            if self.names_ours():
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.held = False
        self.close()

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def holder(self):
        try:
            with open(self.path) as f:
                return f.read().strip() or "another process"
        except OSError:
            return "another process"


def file_mode(path, default=0o644):
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return default


def queue_target(path):
    """The file to rewrite: a symlinked queue file is followed, the link stays."""
    return os.path.realpath(path)


def new_file(directory, name, mode):
    """An open temporary file in `directory` with `mode` (not the umask's),
    named so that remove_stale_temps() knows it for one of ours."""
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".%s.%s" % (name, TEMP_MARK))
    os.fchmod(fd, mode)
    return fd, temp


def write_fd(fd, data):
    view = memoryview(data)
    offset = 0
    while offset < len(view):
        offset += os.pwrite(fd, view[offset:], offset)
    os.ftruncate(fd, len(data))  # after, not before: see QueueLock.describe
    os.fsync(fd)


def append_durably(path, text, mode=0o644, sync=True):
    """Append and fsync (unless not `sync`); returns the size before, to
    truncate back to. A new file gets `mode`: that of the queue file, whose
    commands it copies."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        before = os.fstat(fd).st_size
        if before == 0:
            os.fchmod(fd, mode)
        data = text.encode("utf-8")
        try:
            while data:
                data = data[os.write(fd, data):]
            if sync:
                os.fsync(fd)
        except OSError:
            truncate_back(path, before)
            raise
        return before
    finally:
        os.close(fd)


def truncate_back(path, size):
    """Undo an append that must not count (the queue write it belongs to
    failed), so a retry never lists the same jobs twice."""
    try:
        os.truncate(path, size)
    except OSError:
        pass


def fd_signature(fd):
    st = os.fstat(fd)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def same_file(fd, signature, st):
    """True if stat result `st` is the file open as fd (kept open, so its
    inode number is not reused), as it was when `signature` was taken."""
    if fd is None:
        return False
    ours = os.fstat(fd)
    return ((ours.st_dev, ours.st_ino) == (st.st_dev, st.st_ino)
            and (st.st_ino, st.st_size, st.st_mtime_ns) == signature)


class Entry:
    """A queue.yaml entry: its spec and where its text lies in the file."""

    __slots__ = ("start", "end", "spec", "line")

    def __init__(self, start, end, spec, line):
        self.start = start  # offsets into QueueFile.text, minus QueueFile.shift
        self.end = end
        self.spec = spec    # {"command": [...], name: [...]}
        self.line = line    # 1-based line, for messages


def parse_queue(path, text):
    """The entries of a queue file, with the span of text each one occupies.

    Returns (entries, editable): editable is False when the entries cannot be
    cut out one by one (a flow-style list), and the file must be rewritten.
    """
    root = compose_list(path, text)
    if root is None:
        return [], True
    specs = [parse_entry(path, node, number, "command")
             for number, node in enumerate(root.value, 1)]
    if root.flow_style:
        return [Entry(0, 0, spec, node.start_mark.line + 1)
                for spec, node in zip(specs, root.value)], False
    entries, previous_end = [], root.start_mark.index
    for spec, node in zip(specs, root.value):
        start = entry_start(text, previous_end, node.start_mark.index)
        end = line_end(text, content_end(node))
        if start is None or end <= start or start < previous_end:
            return [Entry(0, 0, s, 1) for s in specs], False  # e.g. anchors and aliases
        entries.append(Entry(start, end, spec, node.start_mark.line + 1))
        previous_end = end
    return entries, True


def entry_start(text, gap_start, node_start):
    """Where the line holding an entry's '- ' begins, searching the gap
    between the previous entry and this one (blank lines and comments)."""
    position = text.rfind("\n", 0, gap_start) + 1
    while position <= node_start:
        next_line = text.find("\n", position)
        stripped = text[position:next_line if next_line >= 0 else len(text)].lstrip()
        if stripped.startswith("-") and stripped[1:2] in ("", " ", "\t", "\r"):
            return position
        if next_line < 0:
            break
        position = next_line + 1
    return None


def content_end(node):
    """The offset just after the last character of an entry's own text.

    A block mapping's end mark lies after any comments that follow it, so
    look at the values inside instead."""
    if isinstance(node, yaml.ScalarNode) or getattr(node, "flow_style", False):
        return node.end_mark.index
    children = node.value
    if isinstance(node, yaml.MappingNode):
        children = [part for pair in children for part in pair]
    return max((content_end(child) for child in children), default=node.start_mark.index)


def line_end(text, offset):
    """Extend an offset to the end of its line (a trailing comment included)."""
    if offset > 0 and text[offset - 1] == "\n":
        return offset
    newline = text.find("\n", offset)
    return len(text) if newline < 0 else newline + 1


def read_only(fd):
    """The same file, open for reading only, and fd closed: on Linux a
    retired queue file is watched through such an fd, so that a lease can
    tell whether someone still has it open for writing (written_elsewhere)."""
    if F_SETLEASE is None:
        return fd
    try:
        again = os.open("/proc/self/fd/%d" % fd, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return fd
    os.close(fd)
    return again


def written_elsewhere(fd):
    """Whether some process has this file open for writing (Linux: a read
    lease is refused then; it is released at once). A shell loop that
    appends with `>>` as a whole (`for ...; done >> queue.yaml`) holds the
    file it opened for as long as the loop runs, however often pegasus has
    replaced it since: its jobs are carried over until it closes it. False
    where it cannot be told (other systems, another user's file): the
    RETIRED_WATCH window applies alone."""
    access = os.O_RDONLY | os.O_WRONLY | os.O_RDWR  # (O_ACCMODE)
    if F_SETLEASE is None or fcntl.fcntl(fd, fcntl.F_GETFL) & access != os.O_RDONLY:
        return False  # (our own write access would refuse the lease: read_only() failed)
    # While the lease is held, an open for writing would send SIGIO, whose
    # default ends a process: ignored for those two calls.
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)
    try:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
    except OSError as e:
        return e.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
    finally:
        signal.signal(signal.SIGIO, previous)
    return False


class QueueSettling(PegasusError):
    """The queue file is being rewritten in place: take nothing until it has
    been still for SETTLE seconds (QueueFile.settle_at says when)."""

    def __init__(self, path):
        super().__init__("%s is being rewritten; waiting until it has been still for %g s"
                         % (path, SETTLE))


class QueueProblem(PegasusError):
    """A job that cannot be taken (it cannot be rendered): it stays in the
    file and the walk goes on. `job` and `line` say which it was."""

    def __init__(self, path, line, job, error):
        super().__init__("%s:%d: %s (it stays in the queue; the other jobs go on)"
                         % (path, line, error))
        self.line, self.job, self.error = line, job, error


class QueueFile:
    """queue.yaml, its lock, and consumed.yaml beside it.

    The text and parsed entries are cached and re-read only when the file's
    signature (inode, size, mtime) shows that someone else changed it. The
    file whose signature is kept stays open, so that its inode number cannot
    be reused by a new file of the same size in the same clock tick.

    Others may edit the file while a run goes on, and no edit is lost:
    - An append (`>>`) goes to whatever file is queue.yaml when the writer
      opens it. The file pegasus read stays open (self.source): just before
      renaming its new version over it, pegasus reads what was appended since
      and keeps it; for RETIRED_WATCH seconds after, it watches the replaced
      file and carries bytes appended to it late over to the new one.
    - A writer may write a line in pieces (a program's buffered output is
      cut every few kB, anywhere): a last line without its newline is not
      read, or carried over, until its newline comes or the file has been
      still for SETTLE seconds (a file saved without a final newline).
    - A save that replaces the file (sed -i, editors) or rewrites it in place
      may start from a version read before pegasus took some jobs. Each take
      is kept as text edits (self.history); such a save is rebased: the
      version it most likely started from is found (the fewest lines apart),
      and the takes made since are applied to it again. A rewrite in place
      (`>`, many editors) empties the file and then writes it, perhaps in
      pieces: it is read once the file has been still for SETTLE seconds.
      One that lands on a file pegasus has just replaced is copied back
      over queue.yaml then, and so rebased in turn (carry_over).

    on_commit(jobs, temp_path), when set, is called by commit() once the jobs
    are appended to consumed.yaml (fsynced) and temp_path holds the new queue
    text (fsynced), just before temp_path is renamed over the queue file: the
    take is complete when temp_path no longer exists. If it raises, nothing
    is renamed and the jobs are cut from consumed.yaml again. (temp_path may
    be rewritten before the rename, to keep edits made meanwhile.)
    """

    on_disk = True  # (MemoryQueue: False)

    def __init__(self, path, mode):
        self.path = path
        self.consumed_path = os.path.join(os.path.dirname(path), "consumed.yaml")
        self.lock = QueueLock(path, mode)
        self.stale = True      # parse the file at the next load() even if unchanged
        self.looked_at = None  # (fd, signature) of a broken file load() read last
        self.text = ""
        self.entries = []
        self.editable = True
        self.shift = 0         # added to every Entry offset; see insert()
        self.count = 0         # jobs in the queue, once expanded
        self.on_commit = None
        self.committed = ""    # the text the file holds (or must hold: self.dirty)
        self.dirty = False     # a rebased save waits to be written
        self.source = None     # fd of the file self.raw came from (read or written)
        self.source_signature = None
        self.raw = b""
        self.retired = []      # Retired: the files we renamed over, watched for appends
        self.tail = b""        # a last line waiting for its newline: kept, not parsed
        self.still = {}        # (dev, ino) -> ((size, mtime), first seen): see still_for()
        self.settle_at = None  # when a file that is being written may have settled
        self.history = []      # per recent take, its edits [(old text, new text, job keys)]
        self.history_bytes = 0  # the text those edits hold
        self.edits = []        # the edits of the take in progress

    def load(self):
        """Parse the file if it changed; raises PegasusError if it is broken.
        Hold the lock: a stale save is rebased (see the class docstring)."""
        self.settle_at = None
        self.carry_over()
        try:
            self.parse_current()
        except PegasusError:
            if not self.pieces_waiting():
                raise
            # The rest of a line begun in a replaced copy landed in the file
            # after carry_over() looked: join them, and read it again.
            self.carry_over()
            self.parse_current()

    def pieces_waiting(self):
        """Bytes appended to a replaced copy wait to be carried over: a line's
        first pieces, say."""
        return any(old.seen != old.accounted for old in self.retired)

    def parse_current(self):
        """Read and parse the queue file, unless it is what we have (load())."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self.stale = True  # read it again when it is back, even unchanged
            raise PegasusError("%s: no such file" % self.path) from None
        if (not self.stale and not self.tail
                and same_file(self.source, self.source_signature, st)):
            return
        fd, raw = self.read_current()
        try:
            st = os.fstat(fd)
            foreign = not self.continues(fd, raw)
            if foreign and self.in_place(st) and not self.still_for(st):
                raise QueueSettling(self.path)
            end = self.settled(raw, st)
            text = decode_text(self.path, raw[:end])
            rebased = self.rebase(text, self.committed) if foreign else text
            entries, editable = parse_queue(self.path, rebased)
        except BaseException:
            self.forget_broken()  # keep this one open instead: see changed_on_disk()
            st = os.fstat(fd)
            self.looked_at = (fd, (st.st_ino, len(raw), st.st_mtime_ns))
            raise
        self.forget_broken()
        self.adopt(fd, raw)
        self.tail = raw[end:]
        self.stale = False
        self.text, self.entries, self.editable, self.shift = rebased, entries, editable, 0
        self.count = count_jobs(entries)
        self.committed, self.dirty = rebased, rebased != text

    def read_current(self):
        """(fd, bytes) of the queue file. If it cannot be read (gone, a
        directory for now), it is read again once it is back, even unchanged."""
        try:
            return read_source(self.path)
        except PegasusError:
            self.stale = True
            raise

    def changed_on_disk(self):
        """True if the file is not what load() last looked at (parsed or
        not), or a late append to a replaced one waits to be carried over,
        or a file being written may have settled: someone wrote it since.
        Cheap: a few stats."""
        if self.settle_at is not None and time.monotonic() >= self.settle_at:
            return True
        if any(os.fstat(old.fd).st_size != old.seen for old in self.retired):
            return True
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False  # nothing to read until it is back
        if not self.stale and same_file(self.source, self.source_signature, st):
            return False
        return not (self.looked_at and same_file(*self.looked_at, st))

    def forget_broken(self):
        if self.looked_at is not None:
            os.close(self.looked_at[0])
            self.looked_at = None

    def take(self, choose, before_rename=None, starts=None):
        """Walk the queue from the head and take the jobs `choose` accepts.

        choose(job) returns what to start the job with (having rendered it
        for its slot), or None to leave the job and look at the next
        (backfill), or raises StopScan to look no further; a PegasusError
        leaves that job and the rest of its entry in the file, and the walk
        goes on. Looks at LOOKAHEAD jobs at most, expanding entries lazily.
        Must hold the lock. Returns [(choice, job)] and a list of
        QueueProblem, one per entry that could not be taken from.
        before_rename(temp, jobs), if given, is called as on_commit is (see the
        class docstring): the journal records the take there. starts(choice),
        if given, says whether a job starts now: consumed.yaml lists only
        those (the others with record_started(), when they do).
        """
        taken, problems, seen, index, stop = [], [], 0, 0, False
        self.edits = []
        while index < len(self.entries) and seen < LOOKAHEAD and not stop:
            entry = self.entries[index]
            picked, looked, stop = self.walk(entry, choose, LOOKAHEAD - seen, taken, problems)
            seen += looked
            if picked:
                left = remainder(entry.spec, picked)
                self.replace_entry(index, left, [job.key() for _, job in taken[-len(picked):]])
                index += len(left)
            else:
                index += 1
        if taken or self.dirty:
            now = [job for choice, job in taken if starts is None or starts(choice)]
            self.commit([job for _, job in taken], before_rename, now)
            self.count -= len(taken)
        return taken, problems

    def walk(self, entry, choose, budget, taken, problems):
        """Offer an entry's jobs to choose(); (positions taken, jobs seen, stop)."""
        picked, looked = [], 0
        for position, job in enumerate(itertools.islice(expand_jobs(entry.spec), budget)):
            looked += 1
            try:
                choice = choose(job)
            except StopScan:
                return picked, looked, True
            except PegasusError as e:
                problems.append(QueueProblem(self.path, entry.line, job, e))
                break
            if choice is not None:
                picked.append(position)
                taken.append((choice, job))
        return picked, looked, False

    def replace_entry(self, index, specs, keys=()):
        """Cut an entry's text out; put `specs` (its leftovers) in its place.
        keys: those of the jobs taken from it, for rebase()."""
        entry = self.entries.pop(index)
        if not self.editable:
            self.entries[index:index] = [Entry(0, 0, spec, entry.line) for spec in specs]
            return
        start, end = entry.start + self.shift, entry.end + self.shift
        indent = len(self.text[start:end]) - len(self.text[start:end].lstrip(" "))
        self.insert(start, end, specs, indent, entry.line, index, keys)

    def insert(self, start, end, specs, indent, line, index=0, keys=()):
        """Replace text[start:end] with entries for `specs`, which become
        entries[index:index]; fix up the offsets of the entries after them.

        Mostly the head changes (index 0), and then every later entry moves
        by the same amount: keeping that in self.shift makes it O(1) instead
        of O(queue length). An edit further down (backfill) moves the later
        entries one by one."""
        pieces, new_entries, position = [], [], start
        for spec in specs:
            piece = dump_entry(spec_canonical(spec), indent)
            pieces.append(piece)
            new_entries.append((position, position + len(piece), spec))
            position += len(piece)
        replacement = "".join(pieces)
        if replacement and start > 0 and self.text[start - 1] != "\n":
            replacement = "\n" + replacement
            new_entries = [(s + 1, e + 1, spec) for s, e, spec in new_entries]
        self.edits.append((self.text[start:end], replacement, keys))
        self.text = self.text[:start] + replacement + self.text[end:]
        delta = len(replacement) - (end - start)
        if index == 0:
            self.shift += delta
        else:
            for later in self.entries[index:]:
                later.start += delta
                later.end += delta
        self.entries[index:index] = [Entry(s - self.shift, e - self.shift, spec, line)
                                     for s, e, spec in new_entries]

    def put_back(self, jobs, before_rename=None):
        """Return jobs to the head of the queue (must hold the lock).
        before_rename(temp, jobs): as for take()."""
        self.load()
        self.edits = []
        specs = [job_spec(job) for job in jobs]
        if self.editable:
            if self.entries:
                start = self.entries[0].start + self.shift
            else:
                start = len(self.text)
            self.insert(start, start, specs, 0, 1)
        else:
            self.entries[:0] = [Entry(0, 0, spec, 1) for spec in specs]
        self.count += len(jobs)
        self.write(returned=jobs, before_rename=before_rename)

    def commit(self, jobs, before_rename=None, started=None):
        """Record `jobs` as taken (those `started`, by default all, in
        consumed.yaml) and write the queue file."""
        self.write(jobs, before_rename=before_rename, started=started)

    def write(self, jobs=(), returned=(), before_rename=None, started=None):
        """Write self.text over the queue file, and append `started` (taken
        jobs that start now: by default all of `jobs`) to consumed.yaml
        first; `returned` are jobs put back, for the hook. On failure nothing
        has changed, on disk or here."""
        self.history.append(self.edits)
        self.history_bytes += edits_size(self.edits)
        self.edits = []
        try:
            self.write_text(jobs, returned, before_rename, started)
        except BaseException as e:
            self.history_bytes -= edits_size(self.history.pop())
            if self.stale and self.source is not None:
                os.close(self.source)  # merge() read a save: rebase it again at load()
                self.source = None
            self.text = self.committed
            self.entries, self.editable = parse_queue(self.path, self.text)
            self.shift, self.count = 0, count_jobs(self.entries)
            if isinstance(e, OSError):
                raise QueueWriteError("cannot write %s: %s" % (
                    getattr(e, "pegasus_path", self.path), e.strerror)) from None
            raise
        while len(self.history) > HISTORY_TAKES or self.history_bytes > HISTORY_BYTES:
            self.history_bytes -= edits_size(self.history.pop(0))

    def write_text(self, jobs, returned=(), before_rename=None, started=None):
        if not self.editable:
            self.text = "".join(dump_entry(spec_canonical(e.spec)) for e in self.entries)
            self.entries, self.editable = parse_queue(self.path, self.text)
            self.shift, self.history[:], self.history_bytes = 0, [[]], 0  # (nothing to rebase)
        target = queue_target(self.path)
        mode = file_mode(target)
        data = self.text.encode("utf-8") + self.tail
        fd, temp = new_file(os.path.dirname(target), os.path.basename(target), mode)
        try:
            # The new queue text first: a full disk fails here, before
            # consumed.yaml is touched. consumed.yaml is synced before the
            # rename, so a crash leaves a job in one file or both, never neither.
            write_fd(fd, data)
            mark = self.append_consumed(jobs if started is None else started, mode)
            try:
                if before_rename is not None and (jobs or returned):
                    before_rename(temp, list(jobs) or list(returned))
                if self.on_commit is not None and jobs:
                    self.on_commit(jobs, temp)
                data = self.merge(fd, data, target)
                signature = fd_signature(fd)
                swapped = exchange(temp, target)
                if not swapped:
                    os.replace(temp, target)
            except BaseException:
                if mark is not None:
                    truncate_back(self.consumed_path, mark)
                raise
        except BaseException:
            os.close(fd)
            if os.path.exists(temp):
                os.unlink(temp)
            raise
        # Swapped, temp names the file we replaced: ours, or a save that
        # came after merge() looked (sed -i, an editor), which is kept.
        replaced = self.swapped_out(temp) if swapped else None
        self.retire()
        self.source, self.source_signature, self.raw = fd, signature, data
        self.committed, self.dirty = self.text, False
        if replaced is not None:
            self.put_save(replaced)
        self.carry_over()

    def swapped_out(self, temp):
        """The bytes of the file exchange() put at temp, if it is not our
        source (someone saved over it just now); temp is removed. Never
        raises: the write is done."""
        try:
            fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            ours = self.in_place(st)
            if ours:
                self.say_what_we_read(temp, st)
            os.unlink(temp)
            return None if ours else os.pread(fd, st.st_size, 0)
        except OSError:
            return None
        finally:
            os.close(fd)

    def say_what_we_read(self, path, st):
        """Our source, just replaced by our write: another runner that read it
        too would carry over what was appended to it since it read it, as we
        do, and a job would run twice. A note appended to it says how much we
        read and that we carry what comes after: that runner lets it go (see
        retire()). Not after half a line: a `>>` writer's rest goes there."""
        try:
            if st.st_size < len(self.raw) or (
                    st.st_size and os.pread(self.source, 1, st.st_size - 1) != b"\n"):
                return
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                os.write(fd, RUNNER_READ % (os.getpid(), len(self.raw)))
            finally:
                os.close(fd)
        except OSError:
            pass  # (then the other runner reads what the save kept, as before)

    def append_consumed(self, jobs, mode):
        if not jobs:
            return None
        try:
            return append_durably(self.consumed_path,
                                  dump_entries(j.canonical() for j in jobs), mode)
        except OSError as e:
            e.pegasus_path = self.consumed_path
            raise

    def record_started(self, jobs):
        """Jobs taken earlier (QueueMode.ahead) start now: consumed.yaml lists
        them. Not synced: the journal holds them, and a crash puts them back
        from there. A failure is told once; the jobs run all the same."""
        if not jobs:
            return
        try:
            append_durably(self.consumed_path, dump_entries(j.canonical() for j in jobs),
                           file_mode(queue_target(self.path)), sync=False)
        except OSError as e:
            note_once(("consumed", e.strerror), "cannot write %s: %s; jobs run all the same"
                      % (self.consumed_path, e.strerror))

    def merge(self, fd, data, target):
        """Just before the rename: keep what others wrote to the queue file
        since we read it (appended bytes as they are; a save, rebased)."""
        for _ in range(10):
            if not self.changed(target):
                return data
            new_fd, raw = self.read_current()
            try:
                st = os.fstat(new_fd)
                if self.continues(new_fd, raw):
                    late = self.tail + raw[len(self.raw):]
                    end = self.settled(late, st)
                    text = self.text + decode_text(self.path, late[:end])
                elif self.in_place(st) and not self.still_for(st):
                    raise QueueSettling(self.path)
                else:
                    late = raw
                    end = self.settled(raw, st)
                    text = self.rebase(decode_text(self.path, raw[:end]), self.text)
                    parse_queue(self.path, text)  # never write a broken file
            except BaseException:
                os.close(new_fd)
                raise
            self.adopt(new_fd, raw)
            self.text, self.tail = text, late[end:]
            self.stale = True  # parse the merged text at the next load
            data = text.encode("utf-8") + self.tail
            write_fd(fd, data)
        raise PegasusError("%s keeps changing; no job taken" % self.path)

    def changed(self, target):
        try:
            path = os.stat(target)
        except FileNotFoundError:
            self.stale = True  # read it again when it is back, even unchanged
            raise PegasusError("%s: no such file (removed while running)" % self.path) from None
        ours = os.fstat(self.source)
        return ((path.st_dev, path.st_ino) != (ours.st_dev, ours.st_ino)
                or fd_signature(self.source) != self.source_signature)

    def continues(self, fd, raw):
        """True if `raw`, read from fd, is our last version plus appends
        (not when a last line we took as whole without its newline goes on:
        see settled(); that is a rewrite)."""
        if self.source is None or not raw.startswith(self.raw):
            return False
        if (len(raw) > len(self.raw) and self.raw and not self.raw.endswith(b"\n")
                and not self.tail):
            return False
        return self.in_place(os.fstat(fd))

    def in_place(self, st):
        """Whether the file of stat st is our source (one that is not our
        text plus appends is then being rewritten in place)."""
        if self.source is None:
            return False
        ours = os.fstat(self.source)
        return (ours.st_dev, ours.st_ino) == (st.st_dev, st.st_ino)

    def settled(self, raw, st):
        """How much of raw, read from the file of stat st, counts as written:
        all, unless its last line has no newline yet and the file has not
        been still for SETTLE seconds; then up to that line."""
        if not raw or raw.endswith(b"\n") or self.still_for(st):
            return len(raw)
        return raw.rfind(b"\n") + 1

    def still_for(self, st):
        """Whether the file of stat st has been still for SETTLE seconds: by
        its mtime, or, where the clocks disagree (NFS), as seen from here.
        If not, settle_at says when to look again."""
        now = time.monotonic()
        key, state = (st.st_dev, st.st_ino), (st.st_size, st.st_mtime_ns)
        seen = self.still.get(key)
        if seen is None or seen[0] != state:
            if len(self.still) > 4 * RETIRED_MAX:
                self.still.clear()
            seen = self.still[key] = (state, now)
        waited = max(now - seen[1], time.time() - st.st_mtime_ns / 1e9)
        if waited >= SETTLE:
            return True
        due = now + SETTLE - waited
        self.settle_at = due if self.settle_at is None else min(self.settle_at, due)
        return False

    def settling(self):
        """Something written to the queue file waits to settle: not done yet."""
        return self.settle_at is not None

    def adopt(self, fd, raw):
        """fd, whose content is raw, is now the file we know."""
        if self.source is not None:
            old, new = os.fstat(self.source), os.fstat(fd)
            if (old.st_dev, old.st_ino) == (new.st_dev, new.st_ino):
                os.close(self.source)
            else:
                self.retire(replaced_by=raw)
        st = os.fstat(fd)
        self.source, self.raw = fd, raw
        self.source_signature = (st.st_ino, len(raw), st.st_mtime_ns)

    def retire(self, replaced_by=None):
        """Our source file is replaced: watch it for appends that land late.
        `replaced_by`: the text of someone else's save that replaced it. A
        save reads the file first, so what was appended before it read is in
        it already (see read_by_save): carrying it over too would queue those
        jobs twice, and bring back those the save deleted."""
        if self.source is not None:
            known = self.raw
            size = os.fstat(self.source).st_size
            if replaced_by is not None and size > len(known):
                late = os.pread(self.source, size - len(known), len(known))
                if RUNNER_READ_LINE.search(late):  # another runner's write replaced it:
                    os.close(self.source)          # that runner carries what comes late
                    self.source = None
                    return
                known += late[:read_by_save(known, late, replaced_by)]
            self.retired.append(Retired(read_only(self.source), known))
            self.source = None

    def carry_over(self, at_exit=False):
        """Bytes appended to a queue file after it was replaced (`>>` opened
        it before, wrote after): append them to the current queue file,
        whole lines only (see settled()). A replaced file rewritten in place
        instead (a save that lost the race with our rename) is copied over
        the queue file once still, for load() to rebase."""
        now, keep, half = time.monotonic(), [], []
        for old in self.retired:  # oldest first: a line's pieces land in that order
            st = os.fstat(old.fd)
            old.seen = st.st_size
            if st.st_size == old.accounted:
                continue
            if not old.unchanged(st.st_size):
                half = []
                if self.still_for(st):
                    self.save_over(old, st.st_size)
            else:
                half = self.carry(old, st, half)
        young = [old for old in self.retired if now - old.since < RETIRED_WATCH][-RETIRED_MAX:]
        for old in self.retired:
            if old in young or old.seen != old.accounted or written_elsewhere(old.fd):
                keep.append(old)
            else:
                os.close(old.fd)
        self.retired = keep
        if half:  # (last: join() rewrites the file, which retires ours)
            self.join(half, at_exit)

    def carry(self, old, st, half):
        """Carry over the whole lines appended to a replaced file. `half`,
        the pieces [(file, offset, bytes)] of a line left unfinished in older
        ones, goes in front of them if they go on from it (not a new entry):
        its writer opened the file anew for the rest, which landed here.
        Returns the pieces of the line left unfinished now."""
        late = os.pread(old.fd, st.st_size - old.line, old.line)
        end = self.settled(late, st)
        pending = old.accounted - old.line  # a last line we had without its newline
        goes_on = bool(half) and not pending and not NEW_ENTRY.match(late)
        if goes_on and not end:
            return half + [(old, old.line, late)]
        if not goes_on and end <= pending:
            return [(old, old.line + pending, late[pending:])] if len(late) > pending else half
        head = pieces_text(half) if goes_on else b""
        target = queue_target(self.path)
        try:
            ending, target_st = file_ending(target, pending)
        except OSError:
            ending, target_st = b"", None  # (the append says what is wrong, or makes it)
        if pending and ending == late[:pending]:
            # The queue file ends with that line too (our tail): what follows
            # goes on there, a next line's unfinished start as well, so that
            # the writer's next piece, landing in the queue file, finishes it.
            end = len(late)
            data, own_line = late[pending:], False
        elif ending[-1:] in (b"", b"\n") or self.still_for(target_st):
            data, own_line = head + late[:end], True
            if pending:
                line = late[:late.find(b"\n", pending) + 1 or end]
                note("%s: a last line taken as whole after %g s without its newline went on; "
                     "queued again whole: %s"
                     % (self.path, SETTLE, line.decode("utf-8", "replace").strip()))
        else:
            return []  # the queue file's own last line is being written: not in it
        data = RUNNER_READ_LINE.sub(b"", EDITOR_READ_LINE.sub(b"", data))  # (notes, not jobs)
        try:
            if data:
                append_after_newline(target, data, own_line)
        except OSError as e:
            note("%s: cannot carry over %d bytes appended to it: %s\n%s"
                 % (self.path, len(data), e.strerror, data.decode("utf-8", "replace")))
        if goes_on:
            account_pieces(half)
        start = old.line
        old.account(start, late[:end])
        if end < len(late):
            return [(old, start + end, late[end:])]
        return [] if goes_on else half

    def join(self, half, at_exit=False):
        """`half`, the pieces [(file, offset, bytes)] of a line left
        unfinished in replaced files: if the queue file has grown meanwhile,
        and not by a new entry, its writer opened the file anew for the rest
        (`>>` once per piece), which landed in our new file: put the pieces
        back in front of it (a rewrite), rather than leave a broken line.
        At exit, they go at the end of the queue file in any case: the
        replaced files go with pegasus, and a rest yet to come lands there."""
        if self.source is None or (self.tail and not self.goes_on_tail(half)):
            return  # (with a tail of our own, what the file grew by goes on from that)
        try:
            size = os.fstat(self.source).st_size
            here = self.in_place(os.stat(queue_target(self.path)))
            rest = os.pread(self.source, min(max(size - len(self.raw), 0), 64), len(self.raw))
        except OSError:
            return
        if not here or not rest or NEW_ENTRY.match(rest):
            if at_exit:
                self.hand_over(half)
            return  # else someone else's entry: the pieces wait for their rest, or stillness
        saved = [(older, older.accounted, older.line, older.tail) for older, _, _ in half]
        piece = pieces_text(half)
        account_pieces(half)
        self.tail += piece  # merge() puts the queue file's new bytes after it
        try:
            self.write()
        except PegasusError as e:
            self.tail = self.tail[:-len(piece)]
            for older, accounted, line, tail in reversed(saved):
                older.accounted, older.line, older.tail = accounted, line, tail
            note("%s: cannot join a line begun in a replaced copy to its rest: %s" % (
                self.path, e))

    def goes_on_tail(self, half):
        """Whether the pieces go on from our own unfinished last line: the
        copy they were appended to ended with it, as the queue file does
        (see carry()). Then they go after it, and what the file grew by
        after them."""
        older, offset, _ = half[0]
        return os.pread(older.fd, offset - older.line, older.line) == self.tail

    def hand_over(self, half):
        """Append the pieces of an unfinished line to the queue file as they
        are, on a line of their own (at exit: see join())."""
        if any(written_elsewhere(older.fd) for older, _, _ in half):
            return  # its writer holds the copy: the rest goes there (last_look() says so)
        piece = pieces_text(half)
        try:
            append_after_newline(queue_target(self.path), piece)
        except OSError as e:
            note("%s: cannot carry over a line begun in a replaced copy: %s\n%s"
                 % (self.path, e.strerror, piece.decode("utf-8", "replace")))
            return
        account_pieces(half)

    def last_look(self):
        """At exit: carry over what was appended to replaced files so far,
        and name the writers that still hold one open: no runner will read
        what they write next."""
        try:
            locked = self.lock.try_acquire()
        except PegasusError:
            locked = False
        if locked:
            try:
                self.carry_over(at_exit=True)
            except OSError as e:
                note("%s: cannot carry over appends at exit: %s" % (self.path, e.strerror))
            finally:
                self.lock.release()
        if any(written_elsewhere(old.fd) for old in self.retired):
            note("%s: a process still has a copy pegasus replaced open for writing (a "
                 "`for ...; done >> %s` loop?): what it writes from now on reaches no queue "
                 "file; let it finish, then add its jobs again" % (self.path, self.path))

    def save_over(self, old, size):
        """A replaced file was rewritten in place, and is still now: someone
        saved over it as we renamed."""
        data = os.pread(old.fd, size, 0)
        self.put_save(data)
        old.reset(data)

    def put_save(self, data):
        """Someone's save that missed the queue file: copy it over the queue
        file, and load() rebases it as any save."""
        target = queue_target(self.path)
        fd, temp = new_file(os.path.dirname(target), os.path.basename(target),
                            file_mode(target))
        try:
            write_fd(fd, data)
            os.replace(temp, target)
        except OSError as e:
            note("%s: a save that missed it could not be copied back (%s); it was:\n%s"
                 % (self.path, e.strerror, data.decode("utf-8", "replace")))
            with contextlib.suppress(OSError):
                os.unlink(temp)
        finally:
            os.close(fd)
        self.stale = True

    def rebase(self, text, current):
        """`text` was saved over the queue file by someone else, where we
        had `current`. Apply to it the takes made since the version it most
        likely started from, so a save that raced with a take does not bring
        taken jobs back."""
        missing = []  # the jobs of takes whose entry the save changed
        for edits in self.history[self.likely_base(text, current):]:
            for old, new, keys in edits:
                edited = apply_edit(text, old, new)
                if edited is None:
                    missing += keys
                else:
                    text = edited
        return take_from_save(self.path, text, missing)

    def likely_base(self, text, current):
        """The index in self.history of the first take made after the
        version `text` was edited from (len(history): the current one):
        the version with the fewest lines and jobs apart from it, the newest
        if tied. Jobs count twice: a sweep's one line of values differs in
        every version, and a save that re-quotes or re-indents the file
        differs from every version in every line; the jobs tell them apart.
        Versions are rebuilt backwards from the current text, take by take."""
        delta = collections.Counter(text.splitlines(True))
        delta.subtract(collections.Counter(current.splitlines(True)))
        jobs = self.job_delta(text, current)
        score = sum(map(abs, delta.values())) + 2 * sum(map(abs, jobs.values()))
        best, best_score = len(self.history), score
        for index in range(len(self.history) - 1, -1, -1):
            for old, new, keys in self.history[index]:
                for line in new.splitlines(True):
                    score += abs(delta[line] + 1) - abs(delta[line])
                    delta[line] += 1
                for line in old.splitlines(True):
                    score += abs(delta[line] - 1) - abs(delta[line])
                    delta[line] -= 1
                for key in keys:  # before the take, the version held this job
                    score += 2 * (abs(jobs[key] - 1) - abs(jobs[key]))
                    jobs[key] -= 1
            if score < best_score:
                best, best_score = index, score
        return best

    def job_delta(self, text, current):
        """For each job taken in the history: how many more of it `text`
        holds than `current` (entries expanded up to LOOKAHEAD jobs each)."""
        taken = {key for edits in self.history for _, _, keys in edits for key in keys}
        commands = {key[0] for key in taken}
        delta = collections.Counter()
        for sign, version in ((1, text), (-1, current)):
            try:
                entries, _ = parse_queue(self.path, version)
            except PegasusError:
                return collections.Counter()
            for entry in entries:
                if commands.isdisjoint(entry.spec["command"]):
                    continue
                for job in itertools.islice(expand_jobs(entry.spec), LOOKAHEAD):
                    if job.key() in taken:
                        delta[job.key()] += sign
        return delta

    def append(self, text):
        """Append entries (add mode; must hold the lock): as `>>` does, so
        a running pegasus keeps them whenever it reads."""
        self.load()
        if not self.editable:  # a flow-style list, which '- ' lines would break:
            entries, _ = parse_queue(self.path, text)  # rewrite it whole
            self.entries += entries
            self.write()
            return
        target = queue_target(self.path)
        deadline = time.monotonic() + 10 * SETTLE
        while True:  # someone's last line is on its way: after it, never inside
            ending, st = file_ending(target, 1)
            if ending in (b"", b"\n") or self.still_for(st):
                break
            if time.monotonic() > deadline:
                raise PegasusError("%s: another writer has been half way through a line for "
                                   "%g s; nothing added (try again once it is done)"
                                   % (self.path, 10 * SETTLE))
            time.sleep(0.01)
        append_after_newline(target, text.encode("utf-8"))


class Retired:
    """A queue file pegasus renamed a new one over, watched for appends that
    land late (QueueFile.carry_over)."""

    __slots__ = ("fd", "since", "seen", "accounted", "line", "head", "tail")
    SAMPLE = 512  # bytes compared at each end of the part accounted for

    def __init__(self, fd, known):
        self.fd, self.since = fd, time.monotonic()
        self.reset(known)

    def reset(self, known):
        """The file holds `known` and we have it all."""
        self.head, self.tail = known[:self.SAMPLE], known[-self.SAMPLE:]
        self.accounted = self.seen = len(known)
        self.line = known.rfind(b"\n") + 1  # where the line holding `accounted` starts

    def account(self, start, data):
        """The file's bytes from offset `start`, `data`, are carried over."""
        self.accounted = start + len(data)
        if b"\n" in data:
            self.line = start + data.rfind(b"\n") + 1
        size = min(self.SAMPLE, self.accounted)
        self.tail = os.pread(self.fd, size, self.accounted - size)

    def unchanged(self, size):
        """Whether the part accounted for still holds what it did: a file
        rewritten in place (`>`, an editor) no longer does."""
        return (size >= self.accounted
                and os.pread(self.fd, len(self.head), 0) == self.head
                and os.pread(self.fd, len(self.tail), self.accounted - len(self.tail))
                == self.tail)


def read_by_save(known, late, save):
    """How many bytes of `late`, appended to a file that held `known`, the
    save that replaced the file had read. A save holds what it read, less
    what its writer deleted: so it read up to the end of the entry of the
    last late line it holds that `known` does not (it cannot have had that
    line from elsewhere), the lines it deleted before that included. What
    comes after was appended after it read, and is carried over. A save
    made in lock mode says how much it read (EDITOR_READ): that counts."""
    said = EDITOR_READ_LINE.search(late)
    if said:
        return max(0, min(int(said.group(1)) - len(known), said.start()))
    if late.strip() and late.strip() in save:
        return len(late)  # all of it, as it is (unfinished last line included)
    if known and not known.endswith(b"\n"):  # (late goes on from our own last line)
        return 0
    saved = {line.strip() for line in save.splitlines()}
    had = {line.strip() for line in known.splitlines()}
    lines = late.splitlines(keepends=True)
    read, at, last = 0, 0, None
    for number, line in enumerate(lines):
        at += len(line)
        if line.endswith(b"\n") and line.strip() and line.strip() in saved - had:
            read, last = at, number
    for line in lines[last + 1:] if last is not None else ():
        if not line.endswith(b"\n") or TOP_ENTRY.match(line):
            break
        read += len(line)  # the rest of that entry
    return read


def edits_size(edits):
    """The text a take's edits hold (QueueFile.history_bytes)."""
    return sum(len(old) + len(new) for old, new, _ in edits)


def pieces_text(half):
    """The bytes of a line's pieces [(Retired, offset, bytes)], in order."""
    return b"".join(piece for _, _, piece in half)


def account_pieces(half):
    """The pieces of a line are carried over: each file has them accounted for."""
    for older, offset, piece in half:
        older.account(offset, piece)


def read_source(path):
    """(an open fd, its bytes) of the queue file; errors name it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PegasusError("%s: no such file" % path) from None
    except PermissionError:
        raise PegasusError("%s: cannot read: permission denied" % path) from None
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return fd, b"".join(chunks)
            chunks.append(chunk)
    except IsADirectoryError:
        os.close(fd)
        raise PegasusError("%s: is a directory, not a YAML file" % path) from None


def file_ending(path, count):
    """The last `count` bytes of a file (at least 1), and its stat."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        count = min(max(count, 1), st.st_size)
        return os.pread(fd, count, st.st_size - count), st
    finally:
        os.close(fd)


def append_after_newline(path, data, own_line=True):
    """Append, starting a new line if the file does not end with one (unless
    own_line is false: data finishes the file's last line)."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        size = os.fstat(fd).st_size
        if own_line and size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)  # never half an entry: it would run cut short
            raise
    finally:
        os.close(fd)


def exchange(a, b):
    """Swap the files at paths a and b in one step: renameat2 with
    RENAME_EXCHANGE (Linux 3.15), renamex_np with RENAME_SWAP (macOS). A
    rename over the queue file would drop, unseen, a save that landed since
    merge() looked; swapped, it is at `a` to be kept. False where the
    system or the file system cannot (NFS, old libc): then rename."""
    if not _EXCHANGE:
        _EXCHANGE.append(exchange_call())
    call = _EXCHANGE[0]
    if call is None:
        return False
    if call(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    error = ctypes_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        _EXCHANGE[0] = None  # not here: rename from now on
        return False
    if error == errno.ENOENT:
        return False  # (the queue file is gone: the rename says so, or makes it)
    raise OSError(error, os.strerror(error), b)


_EXCHANGE = []  # the system's call for exchange(), looked up at the first use


def exchange_call():
    """A function (path_a, path_b) -> 0 or -1 that swaps two paths, or None."""
    try:
        import ctypes
    except ImportError:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        return lambda a, b: libc.renamex_np(a, b, ctypes.c_uint(0x2))  # RENAME_SWAP
    if not sys.platform.startswith("linux"):
        return None
    at_cwd, swap = ctypes.c_int(-100), ctypes.c_uint(0x2)  # AT_FDCWD, RENAME_EXCHANGE
    if hasattr(libc, "renameat2"):  # glibc 2.28
        return lambda a, b: libc.renameat2(at_cwd, a, at_cwd, b, swap)
    number = {"x86_64": 316, "aarch64": 276}.get(os.uname().machine)
    if number is None:
        return None
    return lambda a, b: libc.syscall(ctypes.c_long(number), ctypes.c_long(-100), a,
                                     ctypes.c_long(-100), b, ctypes.c_long(0x2))


def ctypes_errno():
    import ctypes
    return ctypes.get_errno()


def apply_edit(text, old, new):
    """One edit of a take, on a text that may have moved things around:
    `old` as a whole entry anywhere ("" is the head); None if it is gone."""
    if not old:
        head = re.search(r"^[ \t]*-(?:[ \t]|$)", text, re.M)
        position = head.start() if head else len(text)
        if position == len(text) and text and not text.endswith("\n"):
            new = "\n" + new
        return text[:position] + new + text[position:]
    position = text.find(old)
    while position >= 0 and not whole_lines(text, position, position + len(old)):
        position = text.find(old, position + 1)
    if position < 0:
        return None
    return text[:position] + new + text[position + len(old):]


def take_from_save(path, text, keys):
    """The entries of some takes are not in a save as they were: its writer
    changed them (added values to a sweep, say). Take the jobs with these
    keys from the entries of the save that hold them, each rewritten as a
    take writes it. Jobs no entry holds (deleted, changed): the save wins."""
    needed = collections.Counter(keys)
    try:
        entries, editable = parse_queue(path, text) if needed else ([], False)
    except PegasusError:
        return text
    cuts = []
    for entry in entries if editable else ():
        if all(key[0] not in entry.spec["command"] for key in +needed):
            continue
        positions = []
        for position, job in enumerate(itertools.islice(expand_jobs(entry.spec), LOOKAHEAD)):
            if needed[job.key()] > 0:
                needed[job.key()] -= 1
                positions.append(position)
        if positions:
            cuts.append((entry, positions))
    for entry, positions in reversed(cuts):  # from the end: earlier offsets hold
        piece = text[entry.start:entry.end]
        indent = len(piece) - len(piece.lstrip(" "))
        left = "".join(dump_entry(spec_canonical(spec), indent)
                       for spec in remainder(entry.spec, positions))
        text = text[:entry.start] + left + text[entry.end:]
    return text


def whole_lines(text, start, end):
    """Whether text[start:end] begins and ends at line boundaries."""
    return ((start == 0 or text[start - 1] == "\n")
            and (end == len(text) or text[end - 1] == "\n" or text[end] == "\n"))


class MemoryQueue:
    """Jobs given as arguments or on stdin: QueueFile's interface, kept in
    memory. Nothing is written (no queue file, no consumed.yaml): a one-liner
    leaves no files behind, and there is no file for lock mode to edit."""

    on_disk = False

    def __init__(self, jobs, path):
        self.path = path          # what messages call it: <command line> or <stdin>
        self.jobs = list(jobs)
        self.count = len(self.jobs)
        self.lock = MemoryLock(path)

    @property
    def entries(self):
        return [Entry(0, 0, job_spec(job), number) for number, job in enumerate(self.jobs, 1)]

    def load(self):
        pass  # nobody else can change it

    def changed_on_disk(self):
        return False

    def settling(self):
        return False

    def take(self, choose, before_rename=None, starts=None):
        """As QueueFile.take: walk from the head, take what `choose` accepts;
        a job that cannot be rendered stays, and the walk goes on."""
        taken, kept, problems, looked = [], [], [], 0
        for number, job in enumerate(self.jobs[:LOOKAHEAD], 1):
            looked += 1
            try:
                choice = choose(job)
            except StopScan:
                kept.append(job)
                break
            except PegasusError as e:
                kept.append(job)
                problems.append(QueueProblem(self.path, number, job, e))
                continue
            if choice is None:
                kept.append(job)
            else:
                taken.append((choice, job))
        self.jobs[:looked] = kept
        self.count = len(self.jobs)
        return taken, problems

    def put_back(self, jobs, before_rename=None):
        self.jobs[:0] = jobs
        self.count = len(self.jobs)

    def commit(self, jobs):
        pass  # nothing records taken jobs: the output and --joblog do

    def record_started(self, jobs):
        pass


class MemoryLock:
    """A lock no one else can hold: there is no file to edit."""

    def __init__(self, path):
        self.path = path

    def try_acquire(self):
        return True

    def release(self):
        pass

    def holder(self):
        return "no one"


def job_spec(job):
    spec = {"command": [job.command]}
    spec.update((key, [value]) for key, value in job.params.items())
    if job.slots != 1:
        spec["slots"] = [str(job.slots)]
    return spec


def spec_canonical(spec):
    """An entry as written back when the file has to be rewritten whole."""
    if len(spec) == 1 and len(spec["command"]) == 1:
        return spec["command"][0]
    return spec


def count_jobs(entries):
    total = 0
    for entry in entries:
        size = 1
        for values in entry.spec.values():
            size *= len(values)
        total += size
    return total


def check_queue(queue, slots, broadcast=False):
    """Stop a typo in a template before anything connects (see check_command),
    and refuse a job that needs more slots than any host has."""
    largest = max(slot.capacity for slot in slots)
    for entry in queue.entries:
        needs = int(entry.spec.get("slots", ["1"])[0])
        if needs > largest and not broadcast:
            raise PegasusError("%s:%d: this entry's jobs need %d slots, but the largest host "
                               "has %d (give hosts 'slots: N' in the hosts file)"
                               % (queue.path, entry.line, needs, largest))
        for command in dict.fromkeys(entry.spec["command"]):
            if "{{" not in command:  # nothing to render, nothing that can fail
                continue
            try:
                check_command(entry.spec, command, slots)
            except PegasusError as e:
                if not queue.on_disk:  # (commands given as arguments)
                    raise
                raise PegasusError("%s:%d: %s" % (queue.path, entry.line, e)) from None


# At most this many combinations of tested values are rendered per command;
# past it, each tested parameter runs through its values on its own.
CHECK_COMBINATIONS = 4096


def check_command(spec, command, slots):
    """Render one command of an entry every way its jobs can render
    differently: each value of the parameters its block tags test (`#if`,
    `#each`, lookups), one value of the others, on each distinct kind of host.
    So a name used in only one branch of an `#if` is checked wherever that
    branch renders, and a 200 x 1000 entry costs a render or so, not 200,000."""
    try:
        tested = compile_template(command).tested
    except TemplateError:
        tested = set()  # render_job below reports it, naming the job
    params = {k: v for k, v in spec.items() if k not in ("command", "slots")}
    first = {k: v[0] for k, v in params.items()}
    varied = [k for k in params if k in tested]
    choices = [list(dict.fromkeys(params[k])) for k in varied]
    hosts = {}
    for slot in slots:
        shape = (tuple(slot.params), tuple((k, v) for k, v in slot.params.items() if k in tested),
                 slot.hostname if "hostname" in tested else None,
                 slot.capacity if "slots" in tested else None)
        hosts.setdefault(shape, slot)
    needs = int(spec.get("slots", ["1"])[0])
    for values in tested_combinations(choices):
        job = Job(command, dict(first, **dict(zip(varied, values))), needs)
        for slot in hosts.values():
            render_job(job, slot)


def tested_combinations(choices):
    total = 1
    for values in choices:
        total *= len(values)
    if total <= CHECK_COMBINATIONS:
        return itertools.product(*choices)
    base = [values[0] for values in choices]
    return [base[:i] + [value] + base[i + 1:]
            for i, values in enumerate(choices) for value in values]


# A runner's journal, beside the queue file: queue.yaml.<node>.<pid>.running
# (the node's name in it: the directory may be shared by login nodes over NFS).
JOURNAL_SUFFIX = ".running"
COMPACT_AFTER = 10000  # journal lines; then it is rewritten, if mostly done with


class Journal:
    """Which jobs this runner took from the queue and has not finished, so
    that whoever starts next on the queue puts them back if it crashes.

    The runner holds an flock on it for its whole life. The kernel drops the
    lock when its holder dies, however it dies: a journal whose lock is free
    is a dead runner's. Its first line says whose it is and which hosts it
    runs jobs on (its claim); then one line per event, in JSON:

        + [n, temp, job, inode]  job n taken by the queue-file write through
                          `temp`, the file of that inode (temp null: a record
                          rewritten by compact(); taken)
        - [n, temp, inode]  job n put back by the write through `temp`
        - [n]             job n ended: succeeded, or failed for good
        ! temp            the write through `temp` failed: it never happened

    A write's records go in after the new queue text is fsynced to its
    temporary file and before that file is renamed over the queue file (see
    QueueFile.write_text). After a crash, then, `temp` still there means the write
    never happened (its jobs are still in the queue file, or still taken),
    and `temp` gone, or another file there (the one exchange() swapped out),
    means it did: recovery puts back exactly the jobs taken and not ended or
    put back, none twice. "+" records are fsynced: losing
    one to a power cut would lose its jobs. The others are not: a kill -9
    keeps what was written, and losing a "-" to a power cut only runs a job
    again.
    """

    def __init__(self, queue_path):
        self.queue_path = queue_path
        self.node = os.uname().nodename
        self.pid = os.getpid()
        self.path = journal_path(queue_path, self.node, self.pid)
        self.file = None
        self.header = ""  # its first line
        self.records = 0  # lines after the header
        self.numbers = itertools.count(1)
        self.open = {}  # id(job) -> (n, job): taken and not yet ended

    def create(self, claims):
        """Create the journal and lock it; the caller holds the queue lock,
        so no other runner can see it before it is locked."""
        # A file of this name is a dead process's that had this pid: one with
        # its header was adopted just now; one without is a journal that
        # never was.
        remove_file(self.path)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except OSError as e:
            raise PegasusError("%s: cannot create: %s" % (self.path, e.strerror)) from None
        self.file = os.fdopen(fd, "a", encoding="utf-8")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        self.header = json.dumps({"queue": os.path.basename(self.queue_path), "node": self.node,
                                  "pid": self.pid, "started": time.time(), "hosts": claims}) + "\n"
        self.append(self.header, sync=True)
        self.records = 0

    def append(self, text, sync=False):
        self.records += text.count("\n")
        try:
            self.file.write(text)
            self.file.flush()
            if sync:
                os.fsync(self.file.fileno())
        except OSError as e:
            raise QueueWriteError("cannot write %s: %s" % (self.path, e.strerror)) from None

    @contextlib.contextmanager
    def writing(self, kind):
        """Yields the before_rename hook for one QueueFile.take ("+") or
        put_back ("-") within the block. If the write fails after the hook
        ran, the journal says so, and the jobs stay as they were."""
        done = []

        def hook(temp, jobs):
            inode = file_inode(temp)
            if kind == "+":
                numbered = [(next(self.numbers), job) for job in jobs]
                records = [("+", [n, temp, job_record(job), inode]) for n, job in numbered]
            else:
                numbered = [self.open[id(job)] for job in jobs if id(job) in self.open]
                records = [("-", [n, temp, inode]) for n, _ in numbered]
            done[:] = [temp, numbered]  # first: the append may fail half done
            self.append("".join("%s %s\n" % (k, json.dumps(r)) for k, r in records),
                        sync=kind == "+")
        try:
            yield hook
        except BaseException:
            if done:
                try:
                    self.append("! %s\n" % json.dumps(done[0]), sync=True)
                except QueueWriteError:
                    pass  # the error that matters is the one on its way
            raise
        for n, job in done[1] if done else ():
            if kind == "+":
                self.open[id(job)] = (n, job)
            else:
                del self.open[id(job)]
        if self.records > COMPACT_AFTER and self.records > 4 * len(self.open):
            self.compact()

    def compact(self):
        """Rewrite the journal with the open jobs alone, or a long run's
        would grow without end. The new file is locked before it replaces
        the old one; the caller holds the queue lock, which keeps out the
        runners that would adopt a journal whose lock is free."""
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, temp = tempfile.mkstemp(dir=directory, prefix=".pegasus-journal.")
        new = os.fdopen(fd, "a", encoding="utf-8")
        try:
            fcntl.flock(new, fcntl.LOCK_EX)
            new.write(self.header + "".join(
                "+ %s\n" % json.dumps([n, None, job_record(job)])
                for n, job in sorted(self.open.values(), key=lambda item: item[0])))
            new.flush()
            os.fsync(new.fileno())
            os.replace(temp, self.path)
        except OSError as e:
            new.close()
            remove_file(temp)
            note("cannot compact %s: %s" % (self.path, e.strerror))
            return
        self.file.close()
        self.file, self.records = new, len(self.open)

    def ended(self, job):
        """The job no longer needs putting back: it succeeded, or failed for good."""
        if id(job) in self.open:
            n, _ = self.open.pop(id(job))
            self.append("- %s\n" % json.dumps([n]))

    def close(self):
        """At exit: the journal goes, unless some job neither ended nor went
        back (lock mode held the queue); then the next start puts it back."""
        if self.file is None:
            return
        if self.open:
            note("%d job%s did not end and could not go back to %s; the next pegasus "
                 "started on it puts %s back: %s" % (
                     len(self.open), plural(len(self.open)), self.queue_path,
                     "it" if len(self.open) == 1 else "them",
                     ", ".join(describe(job) for _, job in sorted(self.open.values(),
                                                                  key=lambda item: item[0]))))
        else:
            remove_file(self.path)
        self.file.close()
        self.file = None


class NoJournal:
    """The journal of a run whose jobs are in no file (commands given as
    arguments): there is nothing to put them back into after a crash."""

    @contextlib.contextmanager
    def writing(self, kind):
        yield None

    def ended(self, job):
        pass

    def close(self):
        pass


def journal_path(queue_path, node, pid):
    return "%s.%s.%d%s" % (queue_path, node, pid, JOURNAL_SUFFIX)


def job_record(job):
    return [job.command, list(job.params.items()), job.slots]


def describe(job):
    """A job on one line: its command and its parameters."""
    params = ", ".join("%s=%s" % item for item in job.params.items())
    return shown(job.command) + (" (%s)" % params if params else "")


def remove_file(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def file_inode(path):
    """The inode number of the file at path; None if there is none."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def replay(path, lines, inode=file_inode):
    """What a dead runner's journal leaves to do: [(n, job)] for the jobs it
    took and did not end or put back, in the order it took them, and the
    temporary files to delete: of writes that never happened, and the old
    queue files that exchange() swapped out to them."""
    records = []
    for number, line in enumerate(lines, 2):
        try:
            records.append((line[:2], json.loads(line[2:])))
        except ValueError:
            if number == len(lines) + 1:
                break  # cut short by the crash: its write never happened
            raise PegasusError("%s:%d: not a journal record: %r" % (path, number, line)) from None
    failed = {data for kind, data in records if kind == "! "}
    stale = set()

    def happened(temp, written):
        if temp is None:
            return True
        stale.add(temp)
        found = inode(temp)
        # (written None: a journal of an older pegasus, which only renamed)
        return temp not in failed and (found is None or written is not None and found != written)
    taken = {}
    for kind, data in records:
        if kind == "+ " and happened(data[1], (data[3:] or [None])[0]):
            taken[data[0]] = Job(data[2][0], data[2][1], data[2][2])
        elif kind == "- " and (len(data) == 1 or happened(data[1], (data[2:] or [None])[0])):
            taken.pop(data[0], None)
    return list(taken.items()), {temp for temp in stale if inode(temp) is not None}


class OtherRunner:
    """Another runner's journal, as found beside the queue file."""

    def __init__(self, path, header, lines, file, alive):
        self.path = path
        self.header = header
        self.lines = lines  # the records, after the header
        self.file = file    # open, and locked if the runner is dead
        self.alive = alive
        self.pid, self.node = header.get("pid"), header.get("node")
        self.claims = header.get("hosts", [])

    def who(self):
        return "pegasus pid %s on %s" % (self.pid, self.node)

    def append(self, text):
        self.file.seek(0, os.SEEK_END)
        self.file.write(text)
        self.file.flush()

    def state_file(self):
        return StateFile(path=self.path[:-len(JOURNAL_SUFFIX)] + ".state")

    def close(self):
        self.file.close()  # and with it the lock, if taken


def try_lock(file, how, tries=1):
    """Take an flock if it is free, trying `tries` times."""
    for attempt in range(tries):
        try:
            fcntl.flock(file, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(0.02 * (attempt + 1))
    return False


def other_runners(queue_path, mode="r"):
    """The journals beside the queue file, oldest first: mode "r" to look
    (`s`, `stop`), "r+" to adopt the dead ones (their lock stays held)."""
    runners = []
    pattern = glob.escape(queue_path) + ".*" + JOURNAL_SUFFIX
    for path in glob.glob(pattern):
        try:
            f = open(path, mode, encoding="utf-8")
        except FileNotFoundError:
            continue  # its runner just ended
        except OSError as e:
            raise PegasusError("%s: cannot open: %s" % (path, e.strerror)) from None
        # Read once locked: a runner that dies just now may have written more.
        # An adopter tries a few times: `s` may hold a dead runner's lock for
        # an instant, and that must not pass for a live runner.
        if mode == "r":
            alive = not try_lock(f, fcntl.LOCK_SH)
        else:
            alive = not try_lock(f, fcntl.LOCK_EX, tries=5)
        lines = f.read().splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except ValueError:
            header = None
        # A queue named queue.yaml.x has journals that match the pattern too;
        # and a journal without its header is being created or never was.
        if not isinstance(header, dict) or header.get("queue") != os.path.basename(queue_path):
            f.close()
            continue
        runners.append(OtherRunner(path, header, lines[1:], f, alive))
    runners.sort(key=lambda r: r.header.get("started", 0))
    return runners


def start_journal(queue, slots):
    """At start, holding the queue lock: put back the jobs of runners that
    crashed, keep off the hosts that live runners use, and create this
    runner's journal. Returns the journal and the slots left to use."""
    if not queue.on_disk:
        return NoJournal(), slots
    lock, since, told = queue.lock, time.monotonic(), False
    while not lock.try_acquire():
        # Another runner holds it for a moment at each take: not worth a word.
        holder = lock.holder()
        if not told and (re.search(r", pegasus l\b", holder) or time.monotonic() - since > 1):
            note("waiting for %s, held by %s" % (lock.path, holder))
            told = True
        time.sleep(LOCK_RETRY)
    try:
        others = other_runners(queue.path, "r+")
        try:
            recover(queue, [r for r in others if not r.alive])
            journal = Journal(queue.path)
            slots = unclaimed(queue, slots, [r for r in others if r.alive], journal.node)
        finally:
            for runner in others:
                runner.close()
        journal.create(sorted({claim_name(slot, journal.node) for slot in slots}))
        remove_stale_temps(queue_target(queue.path))
    finally:
        lock.release()
    return journal, slots


def remove_stale_temps(target):
    """Remove what crashes left of the queue file's temporary files: those
    that no journal names (created just before one, or put back by a
    swap), long unchanged. A live runner holds one for milliseconds."""
    pattern = os.path.join(glob.escape(os.path.dirname(target)),
                           ".%s.%s*" % (glob.escape(os.path.basename(target)), TEMP_MARK))
    for path in glob.glob(pattern):
        try:
            if time.time() - os.lstat(path).st_mtime > STALE_TEMP_AGE:
                os.unlink(path)
        except OSError:
            pass  # (gone already, or not ours to remove)


def recover(queue, dead):
    """Put back at the head of the queue what crashed runners left running:
    oldest runner first, each one's jobs in the order it took them."""
    found = [(runner,) + replay(runner.path, runner.lines) for runner in dead]
    jobs = [job for _, numbered, _ in found for _, job in numbered]
    written = []

    def hook(temp, _):
        # Should this runner die before it deletes the dead journals, the
        # next one must not put these jobs back a second time.
        written.append(temp)
        inode = file_inode(temp)
        for runner, numbered, _ in found:
            runner.append("".join("- %s\n" % json.dumps([n, temp, inode])
                                  for n, _ in numbered))
    if jobs:
        try:
            queue.put_back(jobs, hook)
        except PegasusError as e:
            for runner, _, _ in found:
                runner.append("".join("! %s\n" % json.dumps(temp) for temp in written))
            raise PegasusError("cannot put back the jobs of a crashed pegasus: %s" % e) from None
    for runner, numbered, stale in found:
        # The journal goes first: while it exists, the stale temporary files
        # are what says that their writes never happened.
        remove_file(runner.path)
        remove_file(runner.state_file().path)
        for temp in stale:
            remove_file(temp)
        if numbered:
            note("put back at the head of %s, from a crashed run (pid %s on %s): %s" % (
                queue.path, runner.pid, runner.node,
                ", ".join(describe(job) for _, job in numbered)))


def claim_name(slot, node):
    """What a runner claims for a slot: its host; this machine, for localhost."""
    return "localhost on %s" % node if slot.is_local else slot.hostname.lower()


def unclaimed(queue, slots, live, node):
    """The slots on hosts no live runner of this queue uses. A host's slots
    are counted by one runner only: two would double-book them."""
    owners = {}
    for runner in live:
        for name in runner.claims:
            owners.setdefault(name, runner)
    kept, refused = [], {}
    for slot in slots:
        name = claim_name(slot, node)
        if name in owners:
            refused.setdefault(owners[name], {})[name] = True  # a dict keeps file order
        else:
            kept.append(slot)
    for owner, names in refused.items():
        if kept:
            note("warning: not using %s: %s runs jobs of %s there" % (
                ", ".join(names), owner.who(), queue.path))
    if not kept:
        raise PegasusError("every host is in use by another pegasus on %s (%s): nothing left to "
                           "run on" % (queue.path, ", ".join(r.who() for r in live)))
    return kept


# ----------------------------------------------------------------------------
# Hosts and ssh: the argv of every ssh we run, and the pool of masters
# ----------------------------------------------------------------------------


def encode_command(command):
    """The command as printf %b input: safe bytes as they are, others as \\0NNN."""
    return "".join(map(ENCODED_BYTES.__getitem__, command.encode("utf-8", "surrogateescape")))


def wrapped_command(command):
    """The text a login shell on the host gets: it runs `command` with sh."""
    encoded = encode_command(command)
    if encoded == command:  # no escapes: save the decoder's fork
        return "exec sh -c 'c=\"$1 \";%s' sh '%s'" % (RUN, command)
    return "exec sh -c '%s%s' sh '%s\\0012'" % (DECODE, RUN, encoded)


def local_argv(command):
    # An absolute path: searching PATH costs a failed execve per entry, per job.
    return ["/bin/sh", "-c", "c=$1;" + RUN, "sh", command + "\n"]


def master_environment():
    """A master's environment: ours, and glibc told to keep up to 8 MB of
    freed heap. A master holds what a session's channel brings while
    pegasus has not read its pipe yet; by default glibc hands that memory
    back after each burst and faults it in again for the next: with 8 jobs
    printing 20 MB each, a third more CPU for the masters (W3). Elsewhere
    the variable means nothing; a user's own setting wins."""
    env = dict(os.environ)
    env.setdefault("GLIBC_TUNABLES", MASTER_MALLOC)
    return env


def ssh_base(options):
    argv = [options.ssh]
    if options.ssh_config:
        argv += ["-F", options.ssh_config]
    for option in options.ssh_option:
        argv += ["-o", option]
    return argv + list(SSH_OPTIONS)


def master_argv(options, hostname, socket, accept_new=False):
    # The master prints MASTER_UP once it has logged in (its control socket
    # exists by then), then runs `cat` on pegasus's pipe: if pegasus dies,
    # cat sees EOF and the master goes too, instead of idling forever.
    keys = ["-o", "StrictHostKeyChecking=accept-new"] if accept_new else []
    # LogLevel=ERROR: its stderr is the reason given when it fails; with the
    # LogLevel QUIET many configs set, it would say nothing (--ssh-option wins).
    return ssh_base(options) + keys + [
        "-o", "LogLevel=ERROR",
        "-o", "ControlMaster=yes", "-o", "ControlPersist=no", "-S", socket,
        "-T", "--", hostname, "echo %s; cat >/dev/null" % MASTER_UP]


_accepts_new_keys = {}  # (ssh argv, hostname) -> what `ssh -G` said


def accepts_new_keys(options, hostname):
    """Pegasus accepts the key of a host it meets for the first time, and so
    do we: StrictHostKeyChecking=accept-new (a key that changed is still
    refused). ssh keeps the first value it sees and -o beats ~/.ssh/config,
    so the option is added only where the user's config and --ssh-option
    leave the default, "ask" (which BatchMode turns into a refusal); `ssh -G`
    says, in a few milliseconds. The masters alone need it: jobs ride on a
    master, which has checked the key already."""
    base = ssh_base(options)
    key = (tuple(base), hostname)
    if key not in _accepts_new_keys:
        try:
            shown = subprocess.run(base + ["-G", "--", hostname], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   universal_newlines=True, timeout=15).stdout
        except (OSError, subprocess.TimeoutExpired):
            shown = ""  # ssh itself will say what is wrong
        _accepts_new_keys[key] = "stricthostkeychecking ask" in shown.splitlines()
    return _accepts_new_keys[key]


def keys_asked_first(options):
    """Whether to ask `ssh -G` before a master's first login rather than
    after a refused key: when --ssh-option sets LogLevel, ssh may not say
    "Host key verification failed", which is what the question waits for."""
    return any(o.replace(" ", "").lower().startswith("loglevel") for o in options.ssh_option)


def job_argv(options, hostname, socket, command):
    return ssh_base(options) + [
        "-o", "ControlMaster=no", "-S", socket,
        "-T", "--", hostname, wrapped_command(command)]  # "--": a hostname is never an option


def launch(options, master, command):
    """(argv, bytes for its stdin) that run `command` over `master`, or here.

    argv is bounded (ARG_MAX, and 128 kB for one argument on Linux), so a
    long command travels on the session's stdin instead, as one line of
    printf %b escapes that the wrapper reads before it starts watching (with
    the newline RUN wants at the end of $c)."""
    if master.socket is None:
        if len(command) <= ARGV_MAX:
            return local_argv(command), b""
        return ["/bin/sh", "-c", READ_LINE + RUN, "sh"], stdin_line(command)
    # A host that allows no session beside the master's own (session_cap 0):
    # each job's ssh logs in by itself, not first asking the master in vain.
    socket = "none" if master.session_cap == 0 else master.socket
    if len(command) <= ARGV_MAX // 5 or len(encode_command(command)) <= ARGV_MAX:
        return job_argv(options, master.hostname, socket, command), b""
    return ssh_base(options) + [
        "-o", "ControlMaster=no", "-S", socket, "-T", "--", master.hostname,
        "exec sh -c '%s%s' sh" % (READ_LINE, RUN)], stdin_line(command)


def stdin_line(command):
    """A long command as the one line READ_LINE reads (see launch)."""
    return encode_command(command + "\n").encode("ascii") + b"\n"


class Pipe:
    """One end of a job's pipe, as much of a file as Run uses: no Python
    buffer object per stream, for thousands of short jobs."""

    def __init__(self, fd):
        self.fd = fd
        self.closed = False

    def fileno(self):
        return self.fd

    def close(self):
        if not self.closed:
            self.closed = True
            os.close(self.fd)


class LocalProcess:
    """A local job's wrapper, started with posix_spawn: what Run needs of a
    Popen (pid, returncode, poll, wait, stdin, stdout, stderr) without its
    Python-side work, nor (before Python 3.10) its fork of this whole
    process; the vfork and exec, ~0.3 ms a job, remain. As Popen does: a new session (cancel signals
    the group), SIGPIPE and SIGXFSZ back to their defaults (Python ignores
    them, and an ignored signal stays ignored across exec), and no stray
    descriptor: every one of ours is close-on-exec (see no_inherited_fds)."""

    def __init__(self, argv):
        fds = []
        try:
            for _ in range(3):
                fds.extend(os.pipe())
            stdin_r, stdin_w, out_r, out_w, err_r, err_w = fds
            self.pid = os.posix_spawn(argv[0], argv, job_environment(), file_actions=[
                (os.POSIX_SPAWN_DUP2, stdin_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2)], setsid=True,
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in (stdin_r, out_w, err_w):
            os.close(fd)
        self.stdin, self.stdout, self.stderr = Pipe(stdin_w), Pipe(out_r), Pipe(err_r)
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            self.reap(os.WNOHANG)
        return self.returncode

    def wait(self):
        if self.returncode is None:
            self.reap(0)
        return self.returncode

    def reap(self, flags):
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:
            pid, status = self.pid, 255 << 8  # reaped elsewhere: its status is lost
        if pid:
            self.returncode = (-os.WTERMSIG(status) if os.WIFSIGNALED(status)
                               else os.WEXITSTATUS(status))


_fds_swept = False
_environment = None


def job_environment():
    """os.environ as a plain dict, made once: posix_spawn converts its
    mapping at every call, and os.environ decodes each item anew (~80 us a
    job, measured). Pegasus never changes its environment."""
    global _environment
    if _environment is None:
        _environment = dict(os.environ)
    return _environment


def no_inherited_fds():
    """Make every descriptor above stderr close-on-exec, once: Popen closes
    them in the child (close_fds), posix_spawn leaves that to the flag, and
    one pegasus inherited without it (a pipe of whoever started pegasus)
    would pass to every job and keep that pipe open."""
    global _fds_swept
    if _fds_swept:
        return
    _fds_swept = True
    directory = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    for name in os.listdir(directory):
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                os.set_inheritable(fd, False)
        except OSError:
            pass  # the listing's own descriptor, closed by now


_posix_spawn_setsid = hasattr(os, "posix_spawn")  # until it says it cannot


def spawn_local(argv):
    """A local job's process: posix_spawn where Python and the C library
    can start a new session with it (glibc 2.26+), Popen elsewhere."""
    global _posix_spawn_setsid
    if _posix_spawn_setsid:
        no_inherited_fds()
        try:
            return LocalProcess(argv)
        except NotImplementedError:
            _posix_spawn_setsid = False
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


# A spawner: a forked copy of pegasus that starts its local jobs, one at a
# time. posix_spawn (a vfork) holds pegasus's one thread until the job has
# exec'd, and that exec waits for a CPU: 0.3 ms a job with 8 short jobs on 2
# cores, 3.5 ms among 8 busy ones. A spawner waits instead, while pegasus
# reads output and takes jobs. It is forked, not started, so that it costs no
# Python start-up (~20 ms). On its socket, pegasus sends
#   j<length>\n<command>   run `sh -c command`, with an empty stdin and the two
#                          pipes the message brings (SCM_RIGHTS) as stdout and
#                          stderr, in a new session (its own process group)
#   g<signal>\n            signal the last job's process group (its leftovers
#                          too, once it has exited)
# and the spawner answers s<pid>\n (started), x<errno>\n (could not start; 0:
# posix_spawn cannot make a session here) and e<wait status>\n (ended).
# EOF (pegasus closed it or died): a running job's group gets TERM, and KILL
# after CANCEL_GRACE, as from RUN's watcher; then the spawner exits. It
# ignores the signals that stop pegasus (pegasus decides what a job gets) and
# is in a session of its own, away from the terminal's Ctrl-C.
SPAWNER_IGNORES = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1,
                   signal.SIGUSR2)


def recv_with_fds(sock, size):
    """(bytes, fds passed with them); the fds close-on-exec where the kernel can."""
    flags = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
    data, ancillary, _, _ = sock.recvmsg(size, socket.CMSG_SPACE(16 * 4), flags)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def spawner_main(sock):
    """The forked child's whole life; it never returns."""
    try:
        gc.disable()  # a collection would touch, and so copy, all of pegasus's memory
        signal.set_wakeup_fd(-1)  # the parent's wakeup pipe is the parent's
        for signum in SPAWNER_IGNORES:
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGWINCH, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        keep = sock.fileno()
        directory = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
        for name in os.listdir(directory):
            if int(name) > 2 and int(name) != keep:
                try:
                    os.close(int(name))
                except OSError:
                    pass  # the listing's own descriptor
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)  # holding pegasus's stdout would keep its reader waiting
        os.close(null)
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        os.setsid()
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        serve_spawns(sock, wake_read)
    finally:
        os._exit(0)


def serve_spawns(sock, wake_read):
    """The spawner's loop, until EOF; then, or if pegasus is gone when it
    answers (EPIPE), a running job is ended as EOF says."""
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    job = group = None  # the running job's pid; the last job's process group
    data, fds = b"", []
    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj == wake_read:
                    os.read(wake_read, 512)
                    continue
                chunk, passed = recv_with_fds(sock, READ_SIZE)
                if not chunk:
                    return
                data, fds = data + chunk, fds + passed
                while True:
                    head, newline, rest = data.partition(b"\n")
                    if not newline or (head[:1] == b"j" and len(rest) < int(head[1:])):
                        break  # the rest is on its way
                    if head[:1] == b"g":
                        data = rest
                        signal_spawned(group, int(head[1:]))
                        continue
                    command, data = rest[:int(head[1:])], rest[int(head[1:]):]
                    out, err = fds[:2]
                    del fds[:2]
                    job, reply = spawn_job(command, out, err)
                    group = job
                    sock.sendall(reply)
            if job is not None:
                pid, status = os.waitpid(job, os.WNOHANG)
                if pid:
                    job = None
                    sock.sendall(b"e%d\n" % status)
    finally:
        end_spawned(job, group)


def signal_spawned(group, signum):
    if group is not None:
        try:
            os.killpg(group, signum)
        except OSError:
            pass  # gone


def spawn_job(command, out, err):
    """(pid or None, the reply that says how it went)."""
    try:
        argv = ["sh", "-c", "--", command]  # (--: a command may start with "-")
        pid = os.posix_spawn("/bin/sh", argv, job_environment(), file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, err, 2)],
            setsid=True, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ) + SPAWNER_IGNORES)
    except OSError as e:
        return None, b"x%d\n" % (e.errno or errno.EIO)
    except NotImplementedError:
        return None, b"x0\n"
    finally:
        os.close(out)
        os.close(err)
    return pid, b"s%d\n" % pid


def end_spawned(job, group):
    """EOF with a job running: TERM to its group, KILL after CANCEL_GRACE."""
    if job is None:
        return
    try:
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + CANCEL_GRACE
        while time.monotonic() < deadline:
            if job is not None and os.waitpid(job, os.WNOHANG)[0]:
                job = None
            if job is None:
                os.killpg(group, 0)  # ProcessLookupError: the group is gone
            time.sleep(0.05)
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass


class Spawner:
    """Pegasus's end of a spawner (see above): one local job at a time, and
    a process that pegasus forked and reaps. Its callbacks' owner is itself."""

    def __init__(self, on_exit):
        self.on_exit = on_exit   # on_exit(spawner): its job has ended
        self.loop = None
        self.sock = None
        self.pid = None          # the spawner's
        self.run = None          # the Run it carries, until that ends
        self.proc = None         # ... and its SpawnedProcess
        self.replies = b""
        self.lost = False        # its socket closed under us

    def start(self, loop):
        """Fork it; OSError if the system cannot (no memory, no processes)."""
        ours, theirs = socket.socketpair()
        job_environment()  # worked out before the fork: the spawner uses it
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SPAWNER_IGNORES + (
            signal.SIGCHLD, signal.SIGWINCH))
        pid = None
        try:
            pid = os.fork()
            if pid == 0:
                ours.close()
                spawner_main(theirs)
        except OSError:
            ours.close()
            raise
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                theirs.close()
        self.sock, self.pid, self.loop = ours, pid, loop
        loop.add_reader(ours.fileno(), self.read, owner=self)

    def spawn(self, run):
        """Send run's command; the run's process (a SpawnedProcess) is
        returned at once. OSError if no pipe can be made or the spawner is gone."""
        fds = []
        try:
            for _ in range(2):
                fds.extend(os.pipe())
            out, out_end, err, err_end = fds
            command = run.command.encode("utf-8", "surrogateescape")
            message = b"j%d\n" % len(command) + command
            sent = self.sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                  array.array("i", [out_end, err_end]))])
            if sent < len(message):  # sendall(b"") fails if the job has just killed us
                self.sock.sendall(message[sent:])
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        os.close(out_end)
        os.close(err_end)
        self.run, self.proc = run, SpawnedProcess(self, out, err)
        return self.proc

    def signal(self, signum):
        if self.sock is None:
            return  # closed: it has ended its job, or is ending it
        try:
            self.sock.sendall(b"g%d\n" % signum)
        except OSError:
            pass  # gone: its EOF says so

    def read(self, fd):
        try:
            chunk = self.sock.recv(4096)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.lose()
            return
        self.replies += chunk
        while b"\n" in self.replies:
            line, self.replies = self.replies.split(b"\n", 1)
            self.reply(line[:1], int(line[1:]))

    def reply(self, kind, value):
        proc = self.proc
        if kind == b"s":
            proc.pid = value
        elif kind == b"x":
            proc.error = "could not start: %s" % (
                os.strerror(value) if value else "no posix_spawn with setsid here")
            proc.returncode = 127
            if not value:
                global _posix_spawn_setsid
                _posix_spawn_setsid = False  # local jobs start with Popen from now on
            self.on_exit(self)
        elif kind == b"e":
            proc.returncode = (-os.WTERMSIG(value) if os.WIFSIGNALED(value)
                               else os.WEXITSTATUS(value))
            self.on_exit(self)

    def lose(self):
        """Its socket closed: killed (`kill -9 $PPID` in the job, say). A
        running job is killed too, and ends as killed by SIGKILL."""
        self.lost = True
        self.close()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            signal_group(proc, signal.SIGKILL)  # by its pid, now
            note("pegasus's spawner (pid %s) of a local job was killed; the job is killed too"
                 % self.pid)
            proc.returncode = -signal.SIGKILL
            self.on_exit(self)

    def wait(self, timeout):
        """Block until its job's end is known (at shut-down, after a KILL)."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:  # select(): fds past 1023
            selector.register(self.sock, selectors.EVENT_READ)
            while self.proc.returncode is None and not self.lost:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    self.proc.returncode = -signal.SIGKILL
                    return
                self.read(self.sock.fileno())

    def close(self):
        """EOF to the spawner: it exits (ending a running job first)."""
        if self.sock is not None:
            self.loop.remove(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def reap(self):
        """True once the spawner process is gone (reaped here)."""
        try:
            return os.waitpid(self.pid, os.WNOHANG)[0] != 0
        except ChildProcessError:
            return True


class SpawnedProcess:
    """What Run needs of a Popen, for a job that a Spawner started."""

    def __init__(self, spawner, stdout, stderr):
        self.spawner = spawner
        self.pid = None          # the job's, once the spawner has said it
        self.returncode = None
        self.error = None        # why it could not start, or was lost
        self.stdin = None
        self.stdout, self.stderr = Pipe(stdout), Pipe(stderr)

    def poll(self):
        return self.returncode

    def wait(self):
        if self.returncode is None:
            self.spawner.wait(CANCEL_GRACE + 1)
        return self.returncode

    def signal(self, signum):
        """Through the spawner, which knows whether the pid is still its
        job's; straight to the group if the spawner is gone."""
        if not self.spawner.lost:
            self.spawner.signal(signum)
        elif self.pid is not None:
            try:
                os.killpg(self.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass


def signal_group(proc, signum):
    """Signal a child's whole process group (it leads one: start_new_session)."""
    if isinstance(proc, SpawnedProcess):
        proc.signal(signum)
        return
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


class Master:
    """One ssh master connection that slots run jobs over; for a local host,
    a stand-in that is always up."""

    def __init__(self, hostname, socket):
        self.hostname = hostname
        self.socket = socket     # ControlPath, or None for a local host
        self.state = "up" if socket is None else "down"  # | "queued" | "connecting"
        self.proc = None         # the ssh process of the current attempt
        self.pipes = {}          # fd -> its stdout or stderr pipe, while open
        self.said = b""          # its stdout, until MASTER_UP
        self.stderr = b""        # its last words, for the error message
        self.why = None          # why pegasus ended the attempt, if it did
        self.ever_up = socket is None
        self.failures = 0        # failed attempts in a row, for the backoff
        self.sessions = 0        # jobs running over it now
        self.deadline = None     # the timer that gives up on a login
        self.agents = []         # its Agents, busy, idle or retired
        self.agent_ok = None     # an agent ran there (True), or cannot (False)
        self.session_cap = None  # agents the host lets it open (sshd's MaxSessions), once known
        self.waiting = collections.deque()  # runs that wait for one of those
        self.accept_new = None   # log in with StrictHostKeyChecking=accept-new; None: not asked
        self.group = [self]      # the masters of its hostname (see make_masters)

    def error(self):
        """Why the master failed: what pegasus knows, or the last line ssh wrote."""
        if self.why:
            return self.why
        self.read_rest()
        if b"REMOTE HOST IDENTIFICATION HAS CHANGED" in self.stderr:
            # ssh's last line says only "Host key verification failed."
            fix = re.search(rb"ssh-keygen -f .* -R .*", self.stderr)
            return "its host key has changed since known_hosts recorded it, and ssh refuses it%s" % (
                " (if the change is expected: %s)" % fix.group().decode("utf-8", "replace").strip()
                if fix else "")
        lines = self.stderr.decode("utf-8", "replace").strip().splitlines()
        if lines:
            return lines[-1]
        code = self.proc.returncode
        if code is not None and code < 0:
            return "its ssh process was killed (%s)" % signal_name(-code)
        return "ssh exited with status %s and said nothing (try: ssh -v %s true)" % (
            code, self.hostname)

    def read_rest(self):
        # The master may be found dead before the loop has read its last
        # words, and they are what says why.
        pipe = self.proc.stderr if self.proc is not None else None  # None: ssh never started
        if pipe is None or pipe.closed:
            return
        os.set_blocking(pipe.fileno(), False)
        try:
            chunk = os.read(pipe.fileno(), READ_SIZE)
            while chunk:
                self.stderr = (self.stderr + chunk)[-4096:]
                chunk = os.read(pipe.fileno(), READ_SIZE)
        except BlockingIOError:
            pass

    def room(self):
        """How many more jobs its agents can start now; None while the host's
        session limit is not known (sshd's MaxSessions: see session_refused)."""
        if self.session_cap is None:
            return None
        free = sum(1 for agent in self.agents if agent.free())
        return max(0, free + self.session_cap - len(self.agents) - len(self.waiting))

    def alive(self):
        """Up, and its process runs (a master whose connection broke exits)."""
        return self.socket is None or (
            self.state == "up" and self.proc is not None and self.proc.poll() is None)


def make_masters(slots, control_dir):
    """One master per hostname, or one per SESSIONS_PER_MASTER slots when a
    hostname has more; every slot of that hostname may use each of them."""
    capacity = {}
    for slot in slots:
        capacity[slot.hostname] = capacity.get(slot.hostname, 0) + slot.capacity
    masters, by_host = [], {}
    for slot in slots:
        if slot.hostname not in by_host:
            local = slot.is_local
            count = 1 if local else -(-capacity[slot.hostname] // SESSIONS_PER_MASTER)
            by_host[slot.hostname] = group = [
                Master(slot.hostname, None if local else
                       os.path.join(control_dir, str(len(masters) + i)))
                for i in range(count)]
            for master in group:
                master.group = group
            masters += by_host[slot.hostname]
        slot.connections = by_host[slot.hostname]
    return masters


class ConnectionPool:
    """The ssh masters: opened at most MAX_CONNECTING at a time, each given
    CONNECT_WAIT to log in, reconnected with backoff when lost (if asked),
    and closed all together at exit. `on_change(master)` hears of every
    master that goes up or down.

    Each attempt is one ssh process whose pipes belong to that attempt: its
    callbacks name the process they were made for, and a pipe is closed only
    after it is unregistered, so a new attempt never meets an old one's fds."""

    def __init__(self, options, slots, loop, on_change):
        self.options = options
        self.loop = loop
        self.on_change = on_change
        self.control_dir = tempfile.mkdtemp(prefix="pegasus-", dir=short_temp_dir())
        self.masters = make_masters(slots, self.control_dir)
        self.reconnect = False   # whether a lost master is connected again
        self.exiting = set()     # masters whose pipes closed before their process exited
        self.closing = False
        self.unreachable = 0     # hosts that failed their first login, for the notes

    def start(self):
        for master in self.masters:
            if master.socket is not None:
                self.connect(master)

    def settled(self):
        """Every master has logged in or failed at least once."""
        return not any(m.state in ("connecting", "queued") for m in self.masters)

    def connect(self, master):
        if sum(1 for m in self.masters if m.state == "connecting") >= MAX_CONNECTING:
            master.state = "queued"  # a thousand handshakes at once exhaust fds
            return
        if os.path.lexists(master.socket):
            os.unlink(master.socket)  # left by a master that was killed
        master.said, master.stderr, master.why = b"", b"", None
        if master.accept_new is None and keys_asked_first(self.options):
            master.accept_new = accepts_new_keys(self.options, master.hostname)
        try:
            proc = subprocess.Popen(
                master_argv(self.options, master.hostname, master.socket, master.accept_new),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, env=master_environment())
        except OSError as e:
            master.state, master.proc = "connecting", None
            master.why = "cannot start ssh: %s" % e.strerror
            self.loop.call_later(0, lambda: self.ended(master), owner=master)
            return
        master.proc, master.state = proc, "connecting"
        master.pipes = {proc.stdout.fileno(): proc.stdout, proc.stderr.fileno(): proc.stderr}
        for fd, is_err in ((proc.stdout.fileno(), False), (proc.stderr.fileno(), True)):
            self.loop.add_reader(fd, lambda fd, p=proc, e=is_err: self.read(master, p, fd, e),
                                 owner=master)
        master.deadline = self.loop.call_later(
            CONNECT_WAIT, lambda: self.give_up(master, proc), owner=master)

    def read(self, master, proc, fd, is_err):
        chunk = os.read(fd, READ_SIZE)
        if chunk and is_err:
            master.stderr = (master.stderr + chunk)[-4096:]
        elif chunk:
            if master.state == "connecting" and master.proc is proc:
                master.said = (master.said + chunk)[-4096:]
                if MASTER_UP.encode() in master.said:
                    self.up(master)
        else:
            self.loop.remove(fd)
            master.pipes.pop(fd).close()
            if not master.pipes:
                self.check_exit(master)

    def check_exit(self, master):
        if master.proc.poll() is None:
            self.exiting.add(master)  # on_child() looks again
        else:
            self.exiting.discard(master)
            self.ended(master)

    def on_child(self):
        for master in list(self.exiting):
            self.check_exit(master)

    def up(self, master):
        self.loop.cancel(master.deadline)
        master.state = "up"
        note("%s %s" % ("reconnected to" if master.ever_up else "connected to", master.hostname))
        master.ever_up = True
        master.failures = 0
        self.connect_queued()  # a handshake slot is free
        self.on_change(master)

    def ended(self, master):
        """The current attempt's ssh has exited: the master is down."""
        self.loop.cancel(master.deadline)
        if master.proc is not None and not master.proc.stdin.closed:
            master.proc.stdin.close()
        was, master.state = master.state, "down"
        if self.closing:
            return
        if was == "connecting" and self.new_key(master):
            self.connect(master)
            return
        if was == "connecting" and master.failures == 0:
            self.unreachable += 1
            if self.unreachable <= CONNECT_NOTES:
                note("cannot connect to %s: %s" % (master.hostname, master.error()))
            elif self.unreachable == CONNECT_NOTES + 1:
                note("cannot connect to more hosts; `pegasus.py s` shows them, and the "
                     "summary names every host never reached")
        elif was == "up":
            note("lost the connection to %s: %s" % (master.hostname, master.error()))
        master.failures += 1
        self.connect_queued()
        if self.reconnect:
            delay = min(RECONNECT_MAX, RECONNECT_FIRST * 2 ** (master.failures - 1))
            self.loop.call_later(delay, lambda: self.retry(master), owner=master)
        self.on_change(master)

    def new_key(self, master):
        """Whether a master's login failed only on a key that accept-new
        takes (see accepts_new_keys): a host met for the first time, under
        a config that leaves StrictHostKeyChecking alone. `ssh -G` is asked
        then, once per host, rather than before every master: a process per
        host, one after another (2 to 5 ms each; a second over 200 hosts)."""
        if master.accept_new is not None:
            return False
        master.read_rest()
        if b"Host key verification failed" not in master.stderr:
            return False
        master.accept_new = accepts_new_keys(self.options, master.hostname)
        return master.accept_new

    def give_up(self, master, proc):
        if master.proc is proc and master.state == "connecting":
            master.why = ("not logged in within %d s (no answer, or a login shell that "
                          "does not finish starting)" % CONNECT_WAIT)
            signal_group(proc, signal.SIGKILL)  # its pipes close; ended() follows

    def retry(self, master):
        if master.state == "down" and not self.closing:
            self.connect(master)

    def connect_queued(self):
        for master in self.masters:
            if master.state == "queued":
                self.connect(master)
                if master.state == "queued":
                    break

    def close(self):
        """End every master at once: EOF to its `cat`, SIGTERM to its ssh."""
        self.closing = True
        for master in self.masters:
            if master.state == "queued":
                master.state = "down"
            proc = master.proc
            if proc is not None and proc.poll() is None:
                proc.stdin.close()
                signal_group(proc, signal.SIGTERM)
        self.loop.call_later(MASTER_CLOSE_WAIT, self.kill_all, owner="pool")

    def kill_all(self):
        for master in self.masters:
            if master.proc is not None and master.proc.poll() is None:
                signal_group(master.proc, signal.SIGKILL)

    def closed(self):
        return all(m.proc is None or m.proc.poll() is not None for m in self.masters)

    def cleanup(self):
        """After the loop: reap what is left, close pipes, remove the sockets."""
        self.kill_all()
        for master in self.masters:
            for pipe in master.pipes.values():
                pipe.close()
            master.pipes = {}
            if master.proc is not None:
                master.proc.wait()
                if not master.proc.stdin.closed:
                    master.proc.stdin.close()
        shutil.rmtree(self.control_dir, ignore_errors=True)


# --- Sessions without an ssh process: the master's control socket ------------
#
# `ssh -S socket host cmd` is a small client that hands its stdin, stdout and
# stderr to the master over the control socket and waits for the exit status:
# about 1.2 MB of memory per running job, 5 GB at 4,000 jobs. MuxSession
# speaks that protocol (PROTOCOL.mux in OpenSSH) itself, inside the loop. The
# protocol is version 4 since OpenSSH 5.4 (the 2010 rewrite of multiplexing)
# and every message used here is unchanged from 7.6 to 9.x. Packets are
#   uint32 length, uint32 type, fields
# with uint32 numbers and booleans, and strings as uint32 length + bytes.

MUX_VERSION = 4
MUX_HELLO = 0x00000001
MUX_NEW_SESSION = 0x10000002
MUX_PERMISSION_DENIED = 0x80000002
MUX_FAILURE = 0x80000003
MUX_EXIT_MESSAGE = 0x80000004
MUX_SESSION_OPENED = 0x80000006
MUX_TTY_ALLOC_FAIL = 0x80000008
MUX_NO_ESCAPE = 0xffffffff
MUX_MAX_PACKET = 256 * 1024  # the master drops a client that sends a longer one
MUX_REQUEST_ID = 1           # one request per connection: any number will do
MUX_PROBE_WAIT = 5.0         # how long a master has to greet a probe (see probe())
# Linux has it; elsewhere SIGPIPE must not kill us: Python ignores it anyway.
SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)


class MuxProtocolError(Exception):
    """The master said something this client does not understand."""


def mux_packet(kind, *fields):
    """A packet: ints are uint32, bytes are strings."""
    body = struct.pack(">I", kind) + b"".join(
        struct.pack(">I", f) if isinstance(f, int) else struct.pack(">I", len(f)) + f
        for f in fields)
    return struct.pack(">I", len(body)) + body


def mux_request(command):
    """What a client says first: HELLO, then a session for `command` (bytes)
    with no tty, no X11, no agent, not a subsystem, no escape character, an
    empty TERM and no environment."""
    return (mux_packet(MUX_HELLO, MUX_VERSION) +
            mux_packet(MUX_NEW_SESSION, MUX_REQUEST_ID, b"", 0, 0, 0, 0, MUX_NO_ESCAPE,
                       b"", command))


def take_packet(data):
    """(the first whole packet's body, the rest), or (None, data)."""
    if len(data) < 4:
        return None, data
    size = struct.unpack(">I", data[:4])[0]
    if size < 4 or size > MUX_MAX_PACKET:
        raise MuxProtocolError("a packet of %d bytes" % size)
    if len(data) < 4 + size:
        return None, data
    return data[4:4 + size], data[4 + size:]


def parse_fields(body, layout):
    """A packet body as its fields, its type first: "u" a uint32, "s" a string."""
    fields, at = [], 0
    for kind in layout:
        if len(body) < at + 4:
            raise MuxProtocolError("a short packet: %r" % body[:64])
        value = struct.unpack(">I", body[at:at + 4])[0]
        at += 4
        if kind == "s":
            value, at = body[at:at + value].decode("utf-8", "replace"), at + value
        fields.append(value)
    return fields


def send_fd(sock, fd):
    # As ssh's mm_send_fd does: one sendmsg per fd with a one-byte payload.
    # The master reads its packets byte-exactly, then recvmsg()s one byte per
    # fd; a byte with an fd attached must never be read as packet data.
    sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                 SEND_FLAGS)


def mux_launch(command):
    """(what the master runs, bytes for the session's stdin) for `command`:
    launch()'s choice for a remote host, for a MuxSession. A long command
    travels on stdin (and so needs a stdin pipe of its own); the request
    itself must stay under MUX_MAX_PACKET, which ARGV_MAX keeps it well under."""
    if len(command) <= ARGV_MAX // 5 or len(encode_command(command)) <= ARGV_MAX:
        return wrapped_command(command), b""
    return ("exec sh -c '%s%s' sh" % (READ_LINE, RUN),
            encode_command(command + "\n").encode("ascii") + b"\n")


class MuxSession:
    """One session over a master's control socket, with no ssh process: the
    loop's to drive, the caller's to read.

    start(loop, owner) connects and sends the request without ever waiting
    for the master (a stuck master only delays the callbacks). Its pipes are
    the caller's from then on, to read to EOF and close:
      stdout, stderr   read ends; the master holds the write ends until the
                       session's channel closes (EOF then, in every case)
      stdin            the write end of the session's stdin, or None when the
                       caller passed its own read end to start() (one pipe that
                       pegasus never writes to can serve every session: one fd
                       less each). Closing it is EOF on the remote stdin.
    Then exactly one of:
      on_failed(session, reason)  the session never opened: the master said
          no (MaxSessions reached: "Session open refused by peer"), or is gone.
          session.fallback is True when the master spoke a protocol this class
          does not know: an `ssh -S` client (job_argv) may do better there.
      on_opened(session), later on_exited(session, status)  the session ran
          and its channel closed. status is the remote exit status, or None
          when the master sent none: the remote command died of a signal
          (sshd reports exit-signal, which the master does not pass on; an
          `ssh -S` client exits 255 then), or the master went away
          (session.master_lost tells which).
    close() ends the session at any time, and no callback follows: the master
    sends EOF on the remote stdin (the wrapper's watcher then kills the job)
    and stops reading its output. A pegasus that dies closes it the same way.

    Descriptors: in pegasus, the control socket and the three pipe ends above
    (three with a shared stdin); in the master, four per session too (the
    control connection and the three it was passed), as with an ssh client."""

    def __init__(self, socket_path, command):
        self.socket_path = socket_path
        self.command = command if isinstance(command, bytes) else command.encode(
            "utf-8", "surrogateescape")
        self.stdin = self.stdout = self.stderr = None  # the caller's fds, from start()
        self.on_opened = self.on_failed = self.on_exited = None
        self.state = "new"       # | "hello" | "opening" | "open" | "probing" | "ended"
        self.sock = None         # the control connection, until the channel closes
        self.unsent = []         # bytes, or (fd, close it once sent) to pass
        self.received = b""
        self.session_id = None
        self.exit_status = None
        self.master_lost = False
        self.fallback = False
        self.loop = self.owner = None
        self.probe_sock = self.probe_timer = None
        self.watched = set()     # our sockets' fds registered with the loop
        self.failure = None      # why it never opened (on_failed's reason)
        self.error = None        # a message not understood once it ran

    def start(self, loop, owner=None, stdin=None):
        """Open the pipes and ask the master; OSError if no pipe or socket
        can be made (no fds). `stdin`: a pipe read end the caller keeps open,
        or None for a pipe of its own."""
        self.loop, self.owner = loop, owner
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.open_pipes(stdin)
        except OSError:
            self.sock.close()
            raise
        self.state = "hello"
        self.sock.setblocking(False)
        try:
            self.sock.connect(self.socket_path)
            sent = self.send()
        except OSError as e:  # no master, one whose backlog is full, or one gone
            reason = "cannot reach the master: %s" % (e.strerror or e)
            loop.call_later(0, lambda: self.fail(reason), owner=owner)
            return
        self.watch(self.sock, self.read if sent else self.writable, write=not sent)

    def open_pipes(self, stdin):
        """The caller's pipe ends, and the master's queued to pass after the
        request (each closed here once it is on its way)."""
        theirs = []
        try:
            if stdin is None:
                stdin, self.stdin = os.pipe()
                theirs.append(stdin)
            self.stdout, out_end = os.pipe()
            theirs.append(out_end)
            self.stderr, err_end = os.pipe()
            theirs.append(err_end)
        except OSError:
            for fd in theirs + [self.stdin, self.stdout]:
                if fd is not None:
                    os.close(fd)
            self.stdin = self.stdout = None
            raise
        self.unsent = [mux_request(self.command), (stdin, stdin in theirs),
                       (out_end, True), (err_end, True)]

    def send(self):
        """Write what the master has not had yet; True once all is written.
        OSError (EPIPE, ECONNRESET) if the master is gone."""
        while self.unsent:
            item = self.unsent[0]
            try:
                if isinstance(item, bytes):
                    written = self.sock.send(item, SEND_FLAGS)
                    self.unsent[0] = item[written:]
                    if written < len(item):
                        return False
                else:
                    send_fd(self.sock, item[0])
                    if item[1]:
                        os.close(item[0])  # the master has its own now (in flight)
            except BlockingIOError:
                return False
            self.unsent.pop(0)
        return True

    def watch(self, sock, callback, write=False):
        (self.loop.add_writer if write else self.loop.add_reader)(
            sock.fileno(), callback, owner=self.owner)
        self.watched.add(sock.fileno())

    def unwatch(self, sock):
        if sock.fileno() in self.watched:
            self.watched.discard(sock.fileno())
            self.loop.remove(sock.fileno())

    def writable(self, fd):
        try:
            if not self.send():
                return
        except OSError as e:
            self.fail("the master went away: %s" % e.strerror)
            return
        self.unwatch(self.sock)
        self.watch(self.sock, self.read)

    def read(self, fd):
        try:
            chunk = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.closed_by_master()
            return
        if self.error:
            return  # lost track of the packets: wait for the EOF
        self.received += chunk
        try:
            while self.sock is not None:
                body, self.received = take_packet(self.received)
                if body is None:
                    return
                self.handle(body)
        except MuxProtocolError as e:
            self.protocol_error(str(e))

    def handle(self, body):
        kind = parse_fields(body, "u")[0]
        if self.state == "hello":
            if parse_fields(body, "uu") != [MUX_HELLO, MUX_VERSION]:
                raise MuxProtocolError("greeted with %r" % body[:8])
            self.state = "opening"  # the extensions that may follow mean nothing to us
        elif self.state == "opening" and kind == MUX_SESSION_OPENED:
            _, request, self.session_id = parse_fields(body, "uuu")
            if request != MUX_REQUEST_ID:
                raise MuxProtocolError("an answer to request %d" % request)
            self.state = "open"
            if self.on_opened:
                self.on_opened(self)
        elif self.state == "opening" and kind in (MUX_PERMISSION_DENIED, MUX_FAILURE):
            self.fail("the master refused the session: %s" % parse_fields(body, "uus")[2])
        elif self.state == "open" and kind == MUX_EXIT_MESSAGE:
            self.exit_status = parse_fields(body, "uuu")[2]
        elif self.state == "open" and kind == MUX_TTY_ALLOC_FAIL:
            pass  # no tty was asked for
        else:
            raise MuxProtocolError("unexpected message 0x%08x while %s" % (kind, self.state))

    def protocol_error(self, what):
        if self.state in ("hello", "opening"):
            self.fallback = True
            self.fail("the master speaks another protocol: %s" % what)
        else:
            # The job runs already: no going back to an ssh client. The
            # master's EOF still ends the session; only the status is lost.
            self.error = what

    def closed_by_master(self):
        """EOF on the control connection: the session's channel has closed
        (the master closes it last, once the output is written), or the
        master is gone."""
        self.drop_connection()
        if self.state in ("hello", "opening"):
            self.fail("the master closed the connection (it has exited, or refused us)")
        elif self.exit_status is not None:
            self.finish()
        else:
            self.probe()

    def probe(self):
        """No exit status came: the remote command died of a signal, or the
        master died. A master greets every new connection at once, so a fresh
        one tells: a greeting says alive; a refusal, EOF or silence, gone."""
        self.state = "probing"
        self.probe_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.probe_sock.setblocking(False)
        try:
            self.probe_sock.connect(self.socket_path)
        except OSError:
            self.probed(False)
            return
        self.watch(self.probe_sock, self.read_probe)
        self.probe_timer = self.loop.call_later(
            MUX_PROBE_WAIT, lambda: self.probed(False), owner=self.owner)

    def read_probe(self, fd):
        try:
            answered = bool(self.probe_sock.recv(64))
        except BlockingIOError:
            return
        except OSError:
            answered = False
        self.probed(answered)

    def probed(self, answered):
        self.drop_probe()
        self.master_lost = not answered
        self.finish()

    def finish(self):
        self.state = "ended"
        if self.on_exited:
            self.on_exited(self, self.exit_status)

    def fail(self, reason):
        if self.state == "ended":
            return
        self.close()
        self.failure = reason
        if self.on_failed:
            self.on_failed(self, reason)

    def drop_connection(self):
        if self.sock is not None:
            self.unwatch(self.sock)
            self.sock.close()
            self.sock = None
        for item in self.unsent:  # fds never passed: their pipes get EOF now
            if not isinstance(item, bytes) and item[1]:
                os.close(item[0])
        self.unsent = []

    def drop_probe(self):
        if self.probe_sock is not None:
            self.unwatch(self.probe_sock)
            self.probe_sock.close()
            self.probe_sock = None
        if self.probe_timer is not None:
            self.loop.cancel(self.probe_timer)
            self.probe_timer = None

    def close(self):
        """End the session from this side (see the class docstring); the
        caller's pipes stay the caller's."""
        self.drop_connection()
        if self.probe_sock is not None or self.probe_timer is not None:
            self.drop_probe()
        self.state = "ended"


def raise_fd_limit():
    # Every running job holds three pipes; 1024 descriptors run out at ~300.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


# ----------------------------------------------------------------------------
# The event loop: one selector for every pipe, signal and timer
# ----------------------------------------------------------------------------


class Loop:
    """A selectors loop with timers. Signals arrive through a wakeup pipe, so
    their handlers run here, between events, never in the middle of one.

    Every callback has an owner (a Run, a Master, or a name). What a callback
    raises is handed to on_error(owner, exception) and the loop goes on: one
    broken job or a bug in one path must not take the other jobs down."""

    def __init__(self, on_error):
        self.on_error = on_error
        self.selector = selectors.DefaultSelector()
        self.timers = []                # heap of [when, seq, callback, owner]
        self.sequence = itertools.count()
        self.signal_handlers = {}
        self.saved_handlers = {}        # signum -> the handler before on_signal()
        self.after_round = []           # called after each round
        self.wake_read, self.wake_write = os.pipe()
        for fd in (self.wake_read, self.wake_write):
            os.set_blocking(fd, False)
        self.selector.register(self.wake_read, selectors.EVENT_READ,
                               (self._on_wakeup, "signals"))
        signal.set_wakeup_fd(self.wake_write)

    def on_signal(self, signum, callback):
        previous = signal.signal(signum, lambda *_: None)  # the work happens in _on_wakeup
        self.saved_handlers.setdefault(signum, previous)
        self.signal_handlers[signum] = callback

    def _on_wakeup(self, fd):
        try:
            data = os.read(fd, 512)
        except BlockingIOError:
            return
        for signum in data:
            handler = self.signal_handlers.get(signum)
            if handler:
                self.call(handler, "signals", signum)

    def add_reader(self, fd, callback, owner=None):
        self.selector.register(fd, selectors.EVENT_READ, (callback, owner))

    def add_writer(self, fd, callback, owner=None):
        self.selector.register(fd, selectors.EVENT_WRITE, (callback, owner))

    def remove(self, fd):
        self.selector.unregister(fd)

    def call_later(self, delay, callback, owner=None):
        timer = [time.monotonic() + delay, next(self.sequence), callback, owner]
        heapq.heappush(self.timers, timer)
        return timer

    def cancel(self, timer):
        if timer is not None:
            timer[2] = None

    def call(self, callback, owner, *args):
        try:
            callback(*args)
        except Exception as e:  # see the class docstring
            self.on_error(owner, e)

    def run(self, done):
        registered = self.selector.get_map()
        while True:
            for callback in self.after_round:
                self.call(callback, "loop")
            if done():
                return
            timeout = None
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            for key, _ in self.selector.select(timeout):
                if registered.get(key.fd) is key:  # not removed by an earlier event
                    self.call(key.data[0], key.data[1], key.fd)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, callback, owner = heapq.heappop(self.timers)
                if callback:
                    self.call(callback, owner)

    def close(self):
        # Signals after the loop get their usual meaning again: a runner
        # stuck writing its summary to a full pipe can still be stopped.
        for signum, handler in self.saved_handlers.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(-1)
        self.selector.close()
        os.close(self.wake_read)
        os.close(self.wake_write)


def read_pipe(fd):
    """What a job's pipe holds, b"" at EOF (EIO: a pty's way to say so). A
    pipe that a read found full is widened (see WIDE_PIPE)."""
    try:
        chunk = os.read(fd, WIDE_READ if fd in _wide_pipes else READ_SIZE)
    except OSError as e:
        if e.errno != errno.EIO:
            raise
        return b""
    if len(chunk) == READ_SIZE:
        widen(fd)
    return chunk


_wide_pipes = set()  # fds of the pipes widen() made wide


def is_wide(fd):
    try:
        return fcntl.fcntl(fd, F_GETPIPE_SZ) >= WIDE_PIPE
    except OSError:  # closed, or no longer a pipe
        return False


def widen(fd):
    """Make a pipe WIDE_PIPE bytes, if fewer than WIDE_PIPES are; whether it
    is. The set is not told when an fd is closed: an entry whose fd is no
    longer a wide pipe (closed, or the number reused) is dropped when it is
    met again or room is needed."""
    if F_SETPIPE_SZ is None:
        return False
    if fd in _wide_pipes:
        if is_wide(fd):
            return True
        _wide_pipes.discard(fd)
    if len(_wide_pipes) >= WIDE_PIPES:
        _wide_pipes.intersection_update([old for old in _wide_pipes if is_wide(old)])
        if len(_wide_pipes) >= WIDE_PIPES:
            return False
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, WIDE_PIPE)
    except OSError:
        return False  # not a pipe (a pty), or past pipe-max-size or the hard limit
    _wide_pipes.add(fd)
    return True


def joined(data, head, stop):
    """The lines that on_lines() is handed (see Run.take_lines) as one
    bytes: for what is not the common case (a terminal, -p N, output that
    is not ASCII, --output-dir)."""
    if not head and stop == len(data):
        return data
    return b"".join((head, memoryview(data)[:stop]))


class Run:
    """One job on one slot, from spawn to exit: its process, its pipes and
    their partial lines, and how it ended. Owned by the Dispatcher."""

    def __init__(self, slot, job, command, indices, attempt, master):
        self.slot = slot
        self.job = job
        self.command = command    # rendered; what the shell runs
        self.indices = indices    # the slot numbers it holds
        self.attempt = attempt    # 2 for the first retry, ...
        self.master = master      # the connection it runs over
        self.label = slot.label   # the output prefix; names the slot numbers held
        if slot.capacity != 1:
            self.label = "%s #%s]" % (slot.label[:-1], ",".join(map(str, indices)))
        self.avoid = set()        # labels of slots this job failed on before
        self.started = time.monotonic()
        self.proc = None
        self.open_fds = {}        # fd -> stdout or stderr pipe, until EOF
        self.partial = {}         # fd -> bytes of an unfinished line
        self.skip_newline = {}    # fd -> the last chunk ended in "\r"
        self.on_lines = None      # on_lines(run, fd, data, head, stop): see take_lines
        self.unsent = b""         # a long command, still to be written to stdin
        self.cancelled = False    # pegasus ended it (Ctrl-C, stop --now)
        self.timed_out = False    # pegasus ended it: it ran past --timeout
        self.forced = False       # ... and had to end its session from this side
        self.host_lost = False    # it ended because its host went away
        self.error = None         # why it could not start or broke, if it did
        self.ended = False
        self.timers = []          # its pending cancel escalations
        self.sequence = 0         # set by Records: its number in this run
        self.wall_start = time.time()
        self.output = None        # its --output-dir file
        self.agent = None         # the Agent that carries it, if one does
        self.nonce = None         # ... and the nonce of its markers there
        self.agent_code = None    # ... and the exit status it reported
        self.agent_term = False   # ... and that the job had a cancel's TERM before it ended
        self.agent_restarted = False  # an agent died before starting it; it went to another
        self.began = False        # it has started: see Dispatcher.begin
        self.requeued = False     # it goes back to the queue unstarted (see wait_for_session)
        self.order = 0            # spawned as the how-manieth (Dispatcher.spawn)

    def spawn(self, argv, unsent):
        # A new session: Ctrl-C in the terminal reaches pegasus only, which
        # decides what the jobs should do; the job's group is ours to kill.
        if self.master.socket is None:
            proc = spawn_local(argv)
        else:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        self.attach(proc, unsent)

    def attach(self, proc, unsent=b""):
        self.proc = proc
        self.open_fds = {proc.stdout.fileno(): proc.stdout, proc.stderr.fileno(): proc.stderr}
        self.unsent = unsent
        if unsent:
            os.set_blocking(self.proc.stdin.fileno(), False)

    def read(self, fd):
        """Read what is there; False at EOF."""
        chunk = read_pipe(fd)
        if chunk:
            self.take_lines(fd, chunk)
            return True
        self.end_stream(fd)
        return False

    def end_stream(self, fd):
        """A stream is over: its last line, if it had no newline."""
        self.skip_newline.pop(fd, None)
        rest = self.partial.pop(fd, b"")
        if rest:
            self.on_lines(self, fd, rest + b"\n", b"", len(rest) + 1)

    def end_streams(self):
        for fd in list(self.partial):
            self.end_stream(fd)

    def take_lines(self, fd, chunk):
        """Hand on a read's complete lines, each ending in "\n", as
        on_lines(run, fd, data, head, stop): the line begun in an earlier
        read (head), then data[:stop]. The read is handed on as it is, never
        copied to join it to head: whole-read bytes operations in C, and no
        Python step per line, since the output volume a runner can carry is
        bound by this (W3). "\r" ends a line too (progress bars), and "\r\n"
        is one line end, even when a read splits it."""
        if self.skip_newline.pop(fd, False) and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        if b"\r" in chunk:  # (a partial line has none left)
            if chunk.endswith(b"\r"):
                self.skip_newline[fd] = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        partial = self.partial.pop(fd, b"")
        end = chunk.rfind(b"\n") + 1
        if end and len(chunk) - end <= MAX_LINE:
            if end < len(chunk):
                self.partial[fd] = chunk[end:]
            self.on_lines(self, fd, chunk, partial, end)
            return
        if end:  # (a read longer than MAX_LINE past its last line end)
            block, rest = joined(chunk, partial, end), chunk[end:]
        else:
            block, rest = b"", partial + chunk
        if len(rest) > MAX_LINE:
            cut = len(rest) - (len(rest) % MAX_LINE or MAX_LINE)
            block += b"".join(rest[i:i + MAX_LINE] + b"\n" for i in range(0, cut, MAX_LINE))
            rest = rest[cut:]
        if rest:
            self.partial[fd] = rest
        if block:
            self.on_lines(self, fd, block, b"", len(block))

    def send(self):
        """Write more of a long command; True when all of it is written."""
        try:
            written = os.write(self.proc.stdin.fileno(), self.unsent[:1 << 16])
        except BlockingIOError:
            return False
        except BrokenPipeError:  # the session is gone; its exit tells why
            written = len(self.unsent)
        self.unsent = self.unsent[written:]
        return not self.unsent

    def close_stdin(self):
        """EOF on the wrapper's stdin: its watcher kills the job's process
        group (TERM, then KILL after CANCEL_GRACE), wherever it runs."""
        self.unsent = b""
        if self.agent is not None:
            self.agent.cancel(self)
        elif self.proc is not None and self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def exit_code(self):
        if self.nonce is not None:
            return self.agent_code
        return None if self.proc is None else self.proc.returncode

    def succeeded(self):
        return self.error is None and self.exit_code() == 0 and not self.stopped()

    def stopped(self):
        """A cancel or --timeout ended the job, not the job itself: it failed
        after one, or it exited 0 once the TERM had reached it (a job may
        catch TERM, save its work and exit 0: it did not finish). An agent
        says whether the TERM came before the job's end; on the other paths
        a cancel sent before the end was seen counts as having come first."""
        if not (self.cancelled or self.timed_out):
            return False
        return self.exit_code() != 0 or self.nonce is None or self.agent_term

    def status(self):
        """How it ended, in words: for its closing line and the summary."""
        code = self.exit_code()
        if self.error:
            return self.error
        if self.stopped():
            ended = ", its session ended by pegasus" if self.forced else ""
            if self.timed_out:
                return "timed out" + ended
            return "cancelled" + ended
        if self.host_lost:
            return "host lost"
        if code is not None and code < 0:
            return "signal %s" % signal_name(-code)
        return "exit status %s" % code


class Agent:
    """A long-lived session on a host that runs one job at a time (see
    AGENT): it replaces one ssh session per job. It parses the markers out of
    its two streams and hands each job's output to that job's Run, and what
    an earlier job's leftovers write to the job before (as that job's). The
    Dispatcher owns it; it owns its session (a MuxSession over the host's
    master: no local process) and the session's pipes, and its callbacks'
    owner is itself."""

    script = None  # AGENT as the line AGENT_BOOT reads

    def __init__(self, dispatcher, master):
        self.dispatcher = dispatcher
        self.loop = dispatcher.loop
        self.master = master
        self.state = "starting"   # -> "idle" <-> "busy"; -> "retired"; -> "closed"
        self.run = None           # the run it carries (or will, once ready)
        self.last = None          # the run before: leftovers write as it
        self.session = None       # its MuxSession
        self.stdin = None         # the write end of the session's stdin, until closed
        self.pipes = set()        # the session's stdout and stderr read ends, until EOF
        self.exited = False       # the session has ended (or never opened)
        self.status = None        # ... with this exit status, if the master sent one
        self.failure = None       # ... or failed for this reason
        self.stream = {}          # fd -> 1 (stdout) or 2 (stderr)
        self.held = {}            # fd -> bytes held back: perhaps a marker's start
        self.in_job = {}          # fd -> between the run's start and end markers
        self.ended = set()        # fds whose end marker the run has had
        self.retired_at = None    # when it refused a job for its leftovers
        self.code = None          # the exit status on the run's stdout end marker
        self.said = b""           # stdout before AGENT_READY
        self.stderr = b""         # stderr before AGENT_READY: why it failed
        self.unsent = b""
        self.writing = False      # a writer is registered for the rest of unsent
        self.eof_wanted = False   # close its stdin once unsent is written
        self.listening = False

    def open(self):
        """Ask the master for the session; OSError if out of fds."""
        self.session = session = MuxSession(self.master.socket, AGENT_BOOT)
        session.on_failed = self.on_failed
        session.on_exited = self.on_exited
        session.start(self.loop, owner=self)
        self.stdin = session.stdin
        os.set_blocking(self.stdin, False)
        for fd, stream in ((session.stdout, 1), (session.stderr, 2)):
            self.pipes.add(fd)
            self.stream[fd] = stream
            self.in_job[fd] = False
        if Agent.script is None:  # (encoded once: 2.6 ms a host, on the way to its first job)
            Agent.script = encode_command(AGENT).encode("ascii") + b"\n"
        self.write(Agent.script)
        self.listen(True)

    def on_failed(self, session, reason):
        self.exited, self.failure = True, reason
        self.check_closed()

    def on_exited(self, session, status):
        self.exited, self.status = True, status
        self.check_closed()

    # -- requests ---------------------------------------------------------------

    def start(self, run):
        """Carry `run`: send it now if ready, else once ready."""
        self.run = run
        run.agent = self
        run.nonce = MARK_BYTE + os.urandom(10).hex().encode()
        if self.state == "idle":
            self.send()

    def send(self):
        self.state = "busy"
        self.dispatcher.begin(self.run)
        self.write(b"j" + self.run.nonce + b" " +
                   encode_command(self.run.command).encode("ascii") + b"\n")

    def cancel(self, run):
        """TERM to the job's process group, KILL after CANCEL_GRACE (the agent
        does both); a job not sent yet simply ends."""
        if self.run is not run or run.agent_code is not None:
            return
        if self.state == "busy":
            self.write(b"k\n")
        elif self.state == "starting":
            self.finish(-signal.SIGTERM)

    def quit(self):
        """No more jobs: the agent exits and leaves leftovers alone."""
        if self.state in ("starting", "idle"):
            self.state = "retired"
            self.write(b"q\n")
        self.close_stdin()

    def kill(self):
        """End it from this side: EOF makes the agent kill a running job."""
        if self.state != "closed":
            self.state = "retired"
        self.unsent = b""
        self.close_stdin()

    def abandon(self):
        """End it from this side now, whatever the host does: EOF to the
        agent (which kills a running job), the session closed, and no more
        reading of pipes that the master holds open for as long as the host
        keeps the session (a hung login shell, say)."""
        self.kill()
        self.listen(False)
        self.let_go()
        self.exited = True
        self.check_closed()

    def discard(self):
        """After the loop: let go of everything, telling no one."""
        self.unsent, self.state, self.writing = b"", "closed", False
        self.close_stdin()
        self.let_go()

    def let_go(self):
        for fd in self.pipes:
            os.close(fd)
        self.pipes = set()
        self.session.close()  # no callback follows

    def write(self, data):
        if self.stdin is None:
            return
        self.unsent += data
        try:
            while self.unsent:
                self.unsent = self.unsent[os.write(self.stdin, self.unsent):]
        except BlockingIOError:
            if not self.writing:
                self.writing = True
                self.loop.add_writer(self.stdin, lambda fd: self.write(b""), owner=self)
            return
        except BrokenPipeError:
            self.unsent = b""  # the session is gone: its EOF tells the rest
        if self.writing:
            self.writing = False
            self.loop.remove(self.stdin)
        if self.eof_wanted:
            self.close_stdin()

    def close_stdin(self):
        self.eof_wanted = True
        if self.unsent or self.stdin is None:
            return  # write() closes it once the rest is sent
        if self.writing:
            self.writing = False
            self.loop.remove(self.stdin)
        os.close(self.stdin)
        self.stdin = None

    # -- output -------------------------------------------------------------------

    def listen(self, on):
        if on != self.listening:
            self.listening = on
            for fd in self.pipes:
                if on:
                    self.loop.add_reader(fd, self.read, owner=self)
                else:
                    self.loop.remove(fd)

    def read(self, fd):
        chunk = read_pipe(fd)
        if not chunk:
            self.eof(fd)
        elif self.state != "starting":
            self.take(fd, chunk)
        elif self.stream[fd] == 2:
            self.stderr = (self.stderr + chunk)[-4096:]
        else:
            self.said += chunk  # a login script may print before the agent runs
            ready = self.said.find(AGENT_READY.encode() + b"\n")
            if ready >= 0:
                rest = self.said[ready + len(AGENT_READY) + 1:]
                self.said = b""
                self.ready()
                if rest:
                    self.take(fd, rest)

    def ready(self):
        self.state = "idle"
        self.master.agent_ok = True
        if self.run is not None:
            self.send()

    def take(self, fd, data):
        """Split a read at the run's markers; whole-read operations in C."""
        data = self.held.pop(fd, b"") + data
        while data:
            run = self.run if self.state == "busy" else None
            if run is None:
                self.leftover(fd, data)
                return
            mark = run.nonce + b" "
            at = find_mark(data, mark)
            if at < 0:
                keep = held_back(data, mark)
                self.deliver(fd, data[:keep])
                if keep < len(data):
                    self.held[fd] = data[keep:]
                return
            end = data.find(b"\n", at + len(mark))
            if end < 0:
                self.deliver(fd, data[:at])
                self.held[fd] = data[at:]
                return
            self.deliver(fd, data[:at])
            word, data = data[at + len(mark):end], data[end + 1:]
            self.marker(fd, run, word)

    def deliver(self, fd, data):
        if not data:
            return
        if self.in_job[fd] or fd in self.ended:
            # (after this stream's end marker, while the other's is to come:
            # the job's own background processes, printed as the job's)
            self.run.take_lines(self.stream[fd], data)
        else:
            self.leftover(fd, data)

    def leftover(self, fd, data):
        """What a finished job's background processes wrote: printed as that
        job's; before any job, a login script's chatter, dropped."""
        if self.last is not None and data:
            if self.last.nonce in data:  # not theirs: a late marker of the job's own
                data = re.sub(re.escape(self.last.nonce) + b" [^\n]*\n", b"", data)
            self.last.take_lines(self.stream[fd], data)

    def free(self):
        """It can take a job: it has none, and is starting or idle."""
        return self.run is None and self.state in ("idle", "starting")

    def job_started(self):
        """The run's start marker has come (on either stream)."""
        return any(self.in_job.values()) or bool(self.ended)

    def marker(self, fd, run, word):
        if word == b"s":
            self.in_job[fd] = True
        elif word == b"r":
            self.state = "retired"  # it has exited; its leftovers may still write
            self.retired_at = time.monotonic()
            self.run = None
            run.agent = None
            self.dispatcher.agent_refused(run)
        elif word.startswith(b"e") and fd not in self.ended:
            # (a second one follows when something kills the job's runner
            # after it wrote the first: the agent reports its death too)
            self.in_job[fd] = False
            run.end_stream(self.stream[fd])
            self.ended.add(fd)
            if self.stream[fd] == 1:
                code, _, term = word[1:].partition(b" ")
                self.code = int(code)
                run.agent_term = term == b"c"
            if len(self.ended) == len(self.stream):
                self.finish(self.code)

    def finish(self, code):
        """The run is over: both streams ended, or it never started."""
        run, self.run = self.run, None
        run.agent_code = code
        self.ended = set()
        if self.last is not None:
            self.last.end_streams()
        self.last = run
        run.on_lines = self.dispatcher.on_leftover
        if self.state == "busy":
            self.state = "idle"
        def ended():
            # The run's end first: it may stop the run (-e), and then no
            # waiting run may start on the session it frees.
            self.dispatcher.check_exit(run)
            self.dispatcher.serve_waiting(self.master)
        self.loop.call_later(0, ended, owner=run)

    # -- the end ----------------------------------------------------------------------

    def eof(self, fd):
        self.loop.remove(fd)
        os.close(fd)
        self.pipes.discard(fd)
        self.held.pop(fd, None)
        self.check_closed()

    def check_closed(self):
        """Closed once both pipes are at EOF and the session has ended."""
        if self.pipes or not self.exited or self.state == "closed":
            return
        was, self.state = self.state, "closed"
        self.unsent = b""
        self.close_stdin()
        if self.last is not None:
            self.last.end_streams()
        self.dispatcher.agent_closed(self, was)

    def exit_status(self):
        """The session's, with 255 for "none": ssh's own, for a failure."""
        return 255 if self.failure or self.status is None else self.status

    def error(self):
        lines = self.stderr.decode("utf-8", "replace").strip().splitlines()
        return self.failure or (lines[-1] if lines else "exit status %s" % self.status)


def find_mark(data, mark):
    """data.find(mark), where mark is a nonce (which starts with MARK_BYTE)
    and a space. memchr finds that byte at memory speed; a find of the
    whole mark in a large read runs CPython's two-way search, several times
    slower (a third of the runner's CPU on W3). Output full of that byte
    (binary data) falls back to the whole find after a few false hits."""
    at = data.find(MARK_BYTE)
    for _ in range(8):
        if at < 0 or data.startswith(mark, at):
            return at
        at = data.find(MARK_BYTE, at + 1)
    return data.find(mark, at) if at >= 0 else -1


def held_back(data, mark):
    """Where a possible start of `mark` begins at the end of `data` (a marker
    may be split between reads), or len(data). find_mark() has found no
    whole mark in it."""
    at = data.find(MARK_BYTE, max(0, len(data) - len(mark) + 1))
    while at >= 0 and not mark.startswith(data[at:]):
        at = data.find(MARK_BYTE, at + 1)
    return len(data) if at < 0 else at


# ----------------------------------------------------------------------------
# Output: whole lines prefixed with their slot, the status line, notes on
# stderr, and the records a run leaves (--joblog, --output-dir, failed.yaml)
# ----------------------------------------------------------------------------

# 256-colour codes that stay readable on dark and light backgrounds.
PALETTE = (39, 208, 70, 170, 178, 33, 203, 36, 141, 166, 75, 132)

_printer = None  # the Printer while a run goes on: a note waits for its lines
_errors = None   # stderr as an Output while a run goes on
_status = None   # the StatusLine on screen, if any; note() clears it first


class Output:
    """One of pegasus's own streams (stdout, stderr), written without ever
    blocking the loop once attach()ed: what the reader does not take yet
    waits in a buffer, and the loop writes it when the fd is writable.

    A terminal is opened again by name for this, so that O_NONBLOCK lands on
    a file description of our own and never on the shell's. A pipe or a file
    is pegasus's alone; its flags are put back by detach()."""

    def __init__(self, stream):
        self.stream = stream
        self.fd = stream.fileno()
        self.chunks = collections.deque()  # bytes (or a view of the first's rest)
        self.size = 0            # bytes in them
        self.broken = False      # EPIPE or EIO: the reader is gone for good
        self.failure = None      # ... or a full disk (its strerror): said, not silent
        self.loop = None
        self.own_fd = False      # fd is the terminal opened again
        self.saved_flags = None  # the flags to put back at detach()
        self.waiting = False     # registered with the loop for EVENT_WRITE, or a timer
        self.wide = False        # a pipe widen() made wide
        self.timer = None        # the pause after a wide pipe's EVENT_WRITE

    def attach(self, loop):
        self.stream.flush()
        try:
            if os.isatty(self.fd):
                self.fd = os.open(os.ttyname(self.fd), os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
                self.own_fd = True
            else:
                self.saved_flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
                fcntl.fcntl(self.fd, fcntl.F_SETFL, self.saved_flags | os.O_NONBLOCK)
                if stat.S_ISFIFO(os.fstat(self.fd).st_mode):
                    self.wide = widen(self.fd)
        except OSError:
            pass  # writes stay blocking, as before attach()
        self.loop = loop

    def detach(self):
        if self.timer is not None:
            self.loop.cancel(self.timer)
            self.timer = None
        elif self.waiting:
            self.loop.remove(self.fd)
        self.waiting = False
        if self.own_fd:
            os.close(self.fd)
            self.fd, self.own_fd = self.stream.fileno(), False
        elif self.saved_flags is not None:
            try:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, self.saved_flags)
            except OSError:
                pass
            self.saved_flags = None
        self.loop = None

    def write(self, data):
        self.write_all((data,))

    def write_all(self, chunks):
        """Queue the chunks and write what the fd takes now. They are kept as
        they are and written with writev: never copied into one buffer, nor
        moved when part of them is written (W3's volume goes through here)."""
        if not self.broken:
            for chunk in chunks:
                if chunk:
                    self.chunks.append(chunk)
                    self.size += len(chunk)
        self.flush()

    def flush(self):
        while self.chunks and not self.broken and not self.waiting:
            try:
                written = os.writev(self.fd, list(itertools.islice(self.chunks, 64)))
            except BlockingIOError:
                if self.loop is not None:
                    self.waiting = True
                    self.loop.add_writer(self.fd, self.writable, owner="output")
                    return
                select.select([], [self.fd], [])  # non-blocking from birth: wait here
                continue
            except OSError as e:  # EPIPE (pegasus | head), EIO (the terminal closed)
                self.broken = True
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    self.failure = e.strerror
                self.drop()
                return
            self.size -= written
            while written:
                first = self.chunks[0]
                if len(first) > written:
                    self.chunks[0] = memoryview(first)[written:]
                    break
                written -= len(first)
                self.chunks.popleft()

    def writable(self, fd):
        """The reader has taken some. Into a wide pipe, pegasus writes once
        it has taken more: a reader taking a page at a time (awk, tee)
        would otherwise get a write, a wake-up and two epoll_ctl per page,
        most of the runner's CPU when its output is piped (W3)."""
        self.loop.remove(fd)
        if self.wide:
            self.timer = self.loop.call_later(OUTPUT_SETTLE, self.settled, owner="output")
        else:
            self.settled()

    def settled(self):
        self.timer = None
        self.waiting = False
        self.flush()

    def pending(self):
        return self.size

    def drop(self):
        self.chunks.clear()
        self.size = 0


class Printer:
    """Writes job output line by line; one write per round of the loop.

    On a terminal, prefixes are coloured per slot (unless NO_COLOR is set)
    and long lines are wrapped to the window's width with the prefix repeated.
    """

    def __init__(self, print_period, stream=None, plain=False, group=False):
        self.print_period = print_period
        self.plain = plain   # --plain: the jobs' lines as they are, and nothing else
        self.groups = {} if group else None  # --group: run -> its lines, until it ends
        self.buffer = []
        self.stream = stream or sys.stdout
        self.output = Output(self.stream)
        self.counts = {}     # (run, fd) -> lines seen, for --print-period
        self.tty = self.stream.isatty()
        self.color = self.tty and not os.environ.get("NO_COLOR")
        self.width = None
        self.prefixes = {}   # slot label -> prefix bytes
        self.resize()

    def resize(self, *_):
        self.width = terminal_width(self.stream) if self.tty else None

    def prefix(self, run):
        if self.plain:
            return b""
        cached = self.prefixes.get(run.label)
        if cached is None:
            label = run.label
            if self.color:
                label = "\x1b[38;5;%dm%s\x1b[0m" % (PALETTE[run.slot.index % len(PALETTE)], label)
            cached = self.prefixes[run.label] = label.encode("utf-8", "replace") + b" "
        return cached

    def lines(self, run, fd, data, head, stop):
        """Print a read's complete lines: head, then data[:stop] (see
        Run.take_lines). The common case (every line, not a terminal,
        ASCII) is one replace in C over the read as it came: W3's output
        volume is bound by this. -p N counts each stream apart."""
        if self.print_period == 0:
            return
        if (self.print_period == 1 and (self.width is None or self.plain) and
                data.isascii() and head.isascii()):
            self.target(run).extend(self.prefixed(run, data, head, stop))
            return
        block = joined(data, head, stop)
        if self.print_period > 1:
            seen = self.counts.get((run, fd), 0)
            lines = block.split(b"\n")[:-1]
            self.counts[run, fd] = seen + len(lines)
            lines = [line for number, line in enumerate(lines, seen + 1)
                     if number % self.print_period == 0]
            if not lines:
                return
            block = b"\n".join(lines) + b"\n"
        if not block.isascii():
            # Per block, not per line: "\n" is never part of a UTF-8
            # sequence, so the replacements fall where they would per line.
            block = block.decode("utf-8", "replace").encode("utf-8")
        if self.width is None or self.plain:
            self.target(run).extend(self.prefixed(run, block))
        else:
            for line in block[:-1].split(b"\n"):
                self.add(run, line)

    def leftover(self, run, block):
        """Lines that a finished job's background processes wrote: under
        its label, straight out (its --group block is gone)."""
        if self.print_period == 0:
            return
        self.buffer.extend(self.prefixed(run, block.decode("utf-8", "replace").encode("utf-8")))

    def prefixed(self, run, data, head=b"", stop=None):
        """The lines head + data[:stop] (each ending in "\n"), with the
        run's prefix, as pieces for writev: one replace in C over data, and
        no other copy of it. The replace leaves a prefix after the last line
        end, and data's unfinished last line after that: a view leaves both
        out (that line has no "\n", so its length is unchanged)."""
        if stop is None:
            stop = len(data)
        prefix = self.prefix(run)
        if not prefix:
            return [head, memoryview(data)[:stop]]
        body = data.replace(b"\n", b"\n" + prefix)
        return [prefix, head, memoryview(body)[:len(body) - (len(data) - stop) - len(prefix)]]

    def target(self, run):
        """Where a run's lines wait: its group (--group), or this round's buffer."""
        return self.buffer if self.groups is None else self.groups[run]

    def add(self, run, data):
        prefix = self.prefix(run)
        room = (self.width or 0) - len(run.label) - 1
        if room < 20 or len(data) <= room or self.plain:
            self.target(run).append(prefix + data + b"\n")
            return
        text = data.decode("utf-8", "replace")
        for start in range(0, len(text), room):
            self.target(run).append(prefix + text[start:start + room].encode("utf-8") + b"\n")

    def started(self, run):
        if self.groups is not None:
            self.groups[run] = []
        if not self.plain:
            self.add(run, ("=== run %s ===" % shown(run.command)).encode("utf-8", "replace"))

    def ended(self, run):
        if self.counts:
            self.counts = {key: n for key, n in self.counts.items() if key[0] is not run}
        elapsed = time.monotonic() - run.started
        if not self.plain:
            self.add(run, ("=== done (%s, %s) ===" % (run.status(), duration(elapsed))
                           ).encode("utf-8", "replace"))
        if self.groups is not None:
            self.buffer.append(b"".join(self.groups.pop(run)))

    def flush(self):
        if not self.buffer:
            return
        chunks, self.buffer = self.buffer, []
        if len(chunks) > 64:  # lines one by one (a terminal, --group): one write
            chunks = [b"".join(chunks)]
        if self.output.broken:
            return
        if _status is not None:
            _status.clear()
        self.output.write_all(chunks)

    def backlog(self):
        return self.output.pending() + sum(map(len, self.buffer))


class StatusLine:
    """One line at the bottom of a terminal (stderr), redrawn in place."""

    def __init__(self, output, stream):
        self.output = output
        self.stream = stream
        self.shown = False

    def draw(self, text):
        if self.output.pending():
            return  # the terminal is not keeping up: skip this redraw
        width = terminal_width(self.stream)
        self.output.write(("\r\x1b[K" + text[:max(0, width - 1)]).encode("utf-8", "replace"))
        self.shown = True

    def clear(self):
        if self.shown:
            self.output.write(b"\r\x1b[K")
            self.shown = False


def terminal_width(stream):
    # The terminal's own size, which follows resizes; $COLUMNS may be stale.
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except OSError:
        return shutil.get_terminal_size().columns


def shown(command):
    """A command on one line, for headers and summaries."""
    return "'%s'" % command.replace("\n", "\\n")


def duration(seconds):
    if seconds < 60:
        return "%.1fs" % seconds
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return "%dh%02dm" % (hours, minutes) if hours else "%dm%02ds" % (minutes, seconds)


def note(message):
    """A message from pegasus itself, as opposed to job output. While a run
    goes on, the job lines printed before it go out first."""
    text = "[pegasus] %s\n" % message
    if _errors is None:
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except OSError:  # the terminal is gone; the run goes on
            pass
        return
    if _printer is not None:
        _printer.flush()
    if _status is not None:
        _status.clear()
    _errors.write(text.encode("utf-8", "replace"))


_noted = set()


def note_once(key, message):
    """note(), once per key: a full disk must not flood the terminal."""
    if key not in _noted:
        _noted.add(key)
        note(message)


JOBLOG_HEADER = "Seq\tSlot\tHost\tStarttime\tJobRuntime\tExitval\tSignal\tCommand\n"


class Records:
    """What a run leaves behind besides its output: one joblog line per
    finished job (GNU parallel's --joblog columns, less Send and Receive, plus
    Slot), each job's output in a file of its own (--output-dir), and failed
    jobs in failed.yaml, ready to requeue. A record that cannot be written
    (disk full, a directory removed) is reported once; the jobs go on."""

    def __init__(self, options, queue_path):
        self.sequence = itertools.count(1)
        self.failed_path = None  # no queue file (commands as arguments): no failed.yaml
        if queue_path is not None:
            self.failed_path = os.path.join(os.path.dirname(queue_path), "failed.yaml")
        self.queue_path = queue_path  # failed.yaml gets its permissions
        self.output_dir = options.output_dir
        self.joblog_path = options.joblog
        self.joblog = None        # its fd, O_APPEND: one write() a line
        self.joblog_lost = 0      # lines that could not be written (a full disk)
        try:
            if self.output_dir:
                os.makedirs(self.output_dir, exist_ok=True)
        except OSError as e:
            raise PegasusError("%s: %s" % (self.output_dir, e.strerror)) from None
        if options.joblog:
            try:
                self.joblog = os.open(options.joblog, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                      | os.O_CLOEXEC, 0o666)
                if os.fstat(self.joblog).st_size == 0:
                    os.write(self.joblog, JOBLOG_HEADER.encode())
            except OSError as e:
                raise PegasusError("%s: %s" % (options.joblog, e.strerror)) from None

    def started(self, run):
        run.sequence = next(self.sequence)
        if not self.output_dir:
            return
        name = "%06d-%s.log" % (run.sequence, run.slot.hostname.replace("/", "_"))
        try:
            os.makedirs(self.output_dir, exist_ok=True)  # it may have been removed
            run.output = open(os.path.join(self.output_dir, name), "wb", buffering=0)
        except OSError as e:
            note_once(("output", e.errno), "cannot keep job output in %s: %s (the jobs go on)"
                      % (self.output_dir, e.strerror))

    def lines(self, run, data, head, stop):
        if run.output is not None:
            try:
                for view in (memoryview(head), memoryview(data)[:stop]):
                    while view:  # unbuffered: a full disk is told now, not lost at close
                        view = view[run.output.write(view):]
            except OSError as e:
                note_once(("output", e.errno), "cannot keep job output in %s: %s (the jobs "
                          "go on)" % (self.output_dir, e.strerror))
                self.close_output(run)

    def close_output(self, run):
        output, run.output = run.output, None
        if output is not None:
            try:
                output.close()
            except OSError:
                pass

    def ended(self, run):
        self.close_output(run)
        if self.joblog is None:
            return
        code = run.exit_code()
        if run.stopped():
            code = -(signal.SIGKILL if run.forced else signal.SIGTERM)
        elif code is None:
            code = -1
        fields = (run.sequence, run.label, run.slot.hostname, "%.3f" % run.wall_start,
                  "%.3f" % (time.monotonic() - run.started),
                  code if code >= 0 else -1, -code if code < -1 else 0,
                  run.command.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t"))
        line = ("\t".join(map(str, fields)) + "\n").encode("utf-8", "surrogateescape")
        try:
            if os.write(self.joblog, line) == len(line):
                return
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            self.joblog_lost += 1
            note_once(("joblog", e.errno), "cannot write %s: %s" % (self.joblog_path, e.strerror))

    def failed(self, job):
        if self.failed_path is None:
            return
        try:
            append_durably(self.failed_path, dump_entry(job.canonical()),
                           file_mode(queue_target(self.queue_path)))
        except OSError as e:
            note("cannot write %s: %s; the job was %s" % (
                self.failed_path, e.strerror, shown(job.command)))

    def close(self):
        if self.joblog is not None:
            os.close(self.joblog)
            self.joblog = None
        if self.joblog_lost:
            note("%s: %d line%s could not be written" % (
                self.joblog_path, self.joblog_lost, plural(self.joblog_lost)))


class StateFile:
    """queue.yaml.<node>.<pid>.state, one per runner: what runs where right
    now, for `pegasus.py s` and `pegasus.py stop` in another terminal.
    Rewritten atomically (no fsync: it describes the moment). Whether its
    runner lives is for its journal to say (see Journal)."""

    def __init__(self, queue_path=None, path=None):
        if path is None:
            path = journal_path(queue_path, os.uname().nodename, os.getpid())
            path = path[:-len(JOURNAL_SUFFIX)] + ".state"
        self.path = path

    def write(self, state):
        if self.path is None:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        temp = None
        try:
            fd, temp = tempfile.mkstemp(dir=directory, prefix=".pegasus-state.")
            with os.fdopen(fd, "w") as f:
                json.dump(state, f, indent=1)
            os.replace(temp, self.path)
        except OSError as e:
            if temp is not None and os.path.exists(temp):
                os.unlink(temp)
            note_once(("state", e.errno), "cannot write %s: %s" % (self.path, e.strerror))

    def read(self):
        """The state; None if there is none yet."""
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise PegasusError("%s: unreadable: %s" % (self.path, e)) from None

    def remove(self):
        remove_file(self.path)


# ----------------------------------------------------------------------------
# Running: the queue gate, the operator's view, the dispatcher that wires the
# parts, and the two policies (queue mode, broadcast mode)
#
# How a job flows: a policy's fill() asks the QueueGate to take jobs (under
# the lock) and hands each (slot, job, command) to Dispatcher.spawn(), which
# makes a Run over a master of the ConnectionPool. The Loop feeds the Run's
# output to the Printer and Records; when the process has exited and its
# pipes are closed, Dispatcher.end() frees the slot and tells the policy,
# which counts the job, retries it, or puts it back through the gate. Every
# stop (Ctrl-C, SIGTERM, SIGHUP, `stop`, `stop --now`) goes through
# Dispatcher.stop(); the exit (put jobs back, close masters, drain output)
# runs inside the loop too, so a signal is obeyed there as well.
# ----------------------------------------------------------------------------

DRAIN, CANCEL, HURRY = 1, 2, 3   # stop levels: no new jobs; cancel jobs; kill now


class QueueGate:
    """The runner's door to the queue file: takes jobs under the lock, puts
    jobs back, and waits (with timers, never blocking the loop) while the
    file is locked by lock mode, broken mid-edit, or cannot be written."""

    def __init__(self, queue, loop, schedule, journal, busy):
        self.journal = journal    # what to put back should this runner crash
        self.busy = busy          # busy(): some job runs, and so may end and free a slot
        self.queue = queue
        self.loop = loop
        self.schedule = schedule  # asks the policy to fill slots again
        self.blocked = False      # take nothing until the retry timer fires
        self.wait_timer = None    # the pending look at the queue file, if any
        self.reported = None      # the last queue problem told to the user
        self.pending = []         # jobs to put back once the lock is free
        self.exit_deadline = None  # at exit: how long to wait for the lock
        self.gave_up = False      # the pending jobs were printed for the user
        self.problems_told = set()  # keys of jobs that could not be rendered, told once
        self.peeked = None        # see queued(): the count a look at the file gave
        self.peek_error = None    # ... or why the file could not be read then
        self.broken = None        # why the last take could take nothing, if the file's fault
        self.peek_at = 0.0        # ... and when the next look may be

    def take(self, choose, starts=None):
        """Take the jobs `choose` accepts (see QueueFile.take). While the file
        is locked or broken, returns [] and takes nothing until a retry."""
        lock = self.queue.lock
        self.peeked = None  # (the take counts)
        if not lock.try_acquire():
            self.block("waiting for %s, held by %s" % (lock.path, lock.holder()),
                       LOCK_RETRY, until_changed=False)
            return []
        taken, error, problems = [], None, []
        try:
            with self.journal.writing("+") as before_rename:
                self.queue.load()
                taken, problems = self.queue.take(choose, before_rename, starts)
        except QueueWriteError as e:
            self.block("%s; no job taken, trying again" % e, WRITE_RETRY, until_changed=False)
        except QueueSettling:
            self.blocked = True  # (quietly: a save in place settles within SETTLE)
            self.retry_later(SETTLE / 4, until_changed=True)
        except PegasusError as e:
            error = e
        except BaseException:
            self.queue.stale = True  # its text may be half-edited: read it again
            raise
        finally:
            lock.release()
        for problem in problems:  # told once each; the walk went on past them
            if problem.job.key() not in self.problems_told:
                self.problems_told.add(problem.job.key())
                note(str(problem))
        if problems and not taken and not self.busy():
            error = "nothing else can start"
        if error is not None:
            self.broken = str(error)
            self.block("%s; waiting for %s to change" % (error, self.queue.path),
                       QUEUE_POLL, until_changed=True)
        elif not self.blocked:
            self.reported = self.broken = None
        return taken

    def block(self, message, delay, until_changed):
        if message != self.reported:
            note(message)
            self.reported = message
        self.blocked = True
        self.retry_later(delay, until_changed)

    def retry_later(self, delay, until_changed):
        """Fill again after `delay`, or once the queue file changes."""
        self.loop.cancel(self.wait_timer)

        def retry():
            self.wait_timer = None
            if until_changed and not self.queue.changed_on_disk():
                self.retry_later(delay, True)
                return
            self.blocked = False
            self.schedule()
        self.wait_timer = self.loop.call_later(delay, retry, owner="queue")

    def queued(self, fresh=False):
        """Jobs in the queue file, for the operator (the status line, `s`, the
        count left at exit): the count of the last take, or, when the file
        has changed since and no take has come (every slot busy, lock mode
        just saved), of a look at it: read only, whole lines, never written,
        at most every PEEK_PERIOD (unless `fresh`: at exit) and for files up to
        PEEK_MAX bytes."""
        queue, now = self.queue, time.monotonic()
        if not queue.on_disk or not fresh and (self.wait_timer is not None or now < self.peek_at):
            return queue.count if self.peeked is None else self.peeked
        self.peek_at = now + PEEK_PERIOD
        self.peeked = None
        if self.blocked or not queue.changed_on_disk():
            return queue.count
        self.peek_error = None
        try:
            with open(queue.path, "rb") as f:
                raw = f.read(PEEK_MAX + 1)
            if len(raw) <= PEEK_MAX:
                text = decode_text(queue.path, raw[:raw.rfind(b"\n") + 1])
                self.peeked = count_jobs(parse_queue(queue.path, text)[0])
        except PegasusError as e:
            self.peek_error = str(e)  # (a take says it too, when its turn comes)
        except OSError:
            pass
        return queue.count if self.peeked is None else self.peeked

    def problem(self):
        """Why the jobs in the queue file cannot be counted now, if they
        cannot: the count shown is then an old one."""
        return self.broken if self.blocked else self.peek_error

    def watch(self):
        """Notice jobs added to the queue file while slots are free."""
        if self.wait_timer is None and self.queue.on_disk:
            self.retry_later(QUEUE_POLL, until_changed=True)

    def put_back(self, jobs):
        """Return jobs to the head of the queue file. A lock-mode editor may
        hold the lock for minutes; then they wait here and go back as soon as
        it is free (at the latest, before pegasus exits). True when none wait."""
        self.pending.extend(jobs)
        self.peeked = None
        if not self.pending or not self.queue.lock.try_acquire():
            return not self.pending
        try:
            with self.journal.writing("-") as before_rename:
                self.queue.put_back(self.pending, before_rename)
            self.pending = []
        except PegasusError as e:
            note_once(("put back", str(e)), "%s; will try again" % e)
        finally:
            self.queue.lock.release()
        return not self.pending

    def finish(self):
        """At exit: put the waiting jobs back, retrying for PUT_BACK_WAIT."""
        if self.put_back([]):
            return
        note("waiting for %s, held by %s, to put jobs back"
             % (self.queue.lock.path, self.queue.lock.holder()))
        self.exit_deadline = time.monotonic() + PUT_BACK_WAIT
        self.loop.call_later(LOCK_RETRY, self.retry_finish, owner="queue")

    def retry_finish(self):
        if self.gave_up or self.put_back([]):
            return
        if time.monotonic() >= self.exit_deadline:
            self.give_up()
        else:
            self.loop.call_later(LOCK_RETRY, self.retry_finish, owner="queue")

    def give_up(self):
        """Stop waiting for the lock; the journal keeps the jobs for the
        next start on this queue (see Journal.close)."""
        if self.pending and not self.gave_up:
            self.gave_up = True
            note("stopped waiting for %s, held by %s" % (
                self.queue.lock.path, self.queue.lock.holder()))

    def settled(self):
        return not self.pending or self.gave_up


class Monitor:
    """What the operator sees besides job output: the status line on a
    terminal, progress lines otherwise, and the state file that `s` and
    `stop` read."""

    def __init__(self, dispatcher):
        self.d = dispatcher
        queue = dispatcher.queue
        # None: a run without a queue file, which `s` and `stop` cannot find
        self.state = StateFile(queue.path) if queue.on_disk else None
        self.dirty = True         # the state file is out of date
        self.started_at = time.monotonic()
        self.run_seconds = 0.0    # summed durations of finished jobs, for the estimate
        self.progress_shown = 0   # tenths of the way reported (stderr not a terminal)
        self.last_progress = time.monotonic()
        self.last_counts = None   # what the last progress line said
        self.stop_taken = None    # the last stop: its level, and the jobs running then
        self.queued = 0           # the queue file's jobs, as of the last tick
        self.problem = None       # ... and why it could not be read then, if it could not

    def counts(self):
        d = self.d
        ahead = getattr(getattr(d, "policy", None), "ahead", ())  # taken, not started yet
        queued = d.queue.count if d.gate.peeked is None else d.gate.peeked
        return d.succeeded + len(d.failures), len(d.runs), queued + len(ahead)

    def ended(self, run):
        if run.began:
            self.run_seconds += time.monotonic() - run.started
        self.dirty = True
        if _status is not None:
            return
        done, running, queued = self.counts()
        total = done + running + queued
        if total >= 10 and done * 10 // total > self.progress_shown:
            self.progress_shown = done * 10 // total
            self.progress()

    def progress(self):
        self.last_progress = time.monotonic()
        self.last_counts = self.counts()
        note("progress: " + self.status_text())

    def tick(self):
        """Every STATUS_PERIOD: redraw the status line, save the state file.
        Without a terminal, a progress line every PROGRESS_PERIOD, but only
        when something changed: an idle daemon stays quiet."""
        self.d.loop.call_later(STATUS_PERIOD, self.tick, owner="monitor")
        queued, problem = self.queued, self.problem
        self.queued, self.problem = self.d.gate.queued(), self.d.gate.problem()
        self.dirty = self.dirty or (self.queued, self.problem) != (queued, problem)
        if _status is not None:
            _status.draw("[pegasus] " + self.status_text())
        elif (time.monotonic() - self.last_progress >= PROGRESS_PERIOD
              and self.counts() != self.last_counts):
            self.progress()
        if self.dirty:
            self.save()

    def save(self):
        """The state file, as of now."""
        self.dirty = False
        if self.state is not None:
            self.state.write(self.snapshot())

    def status_text(self):
        d = self.d
        done, running, queued = self.counts()
        up = d.usable_slots()
        down = len({s.hostname for s in d.slots if s.down()})
        capacity = sum(s.capacity for s in d.slots)
        text = "%d done, %d failed, %d running, %d queued | %d/%d busy" % (
            d.succeeded, len(d.failures), running, queued,
            sum(len(run.indices) for run in d.runs), capacity)
        if down:
            text += ", %d host%s down" % (down, plural(down))
        text += " | %s" % duration(time.monotonic() - self.started_at)
        if done and (running or queued) and up:
            left = self.run_seconds / done * (running + queued) / sum(s.capacity for s in up)
            text += ", ~%s left" % duration(left)
        return text

    def snapshot(self):
        d = self.d
        now, wall = time.monotonic(), time.time()
        room = d.session_room()
        return {
            "pid": os.getpid(), "mode": d.options.mode, "queue": d.queue.path,
            "started": wall - (now - self.started_at),
            "done": d.succeeded, "failed": len(d.failures),
            "running": len(d.runs), "queued": self.counts()[2],
            "stop": self.stop_taken, "queue_problem": d.gate.problem(),
            "queue_wait": d.gate.reported if d.gate.blocked else None,
            "slots": [{"slot": s.label, "host": s.hostname, "connection": s.state,
                       "capacity": s.capacity, "free": s.free,
                       "room": room.get(id(s.connections)),
                       "jobs": [{"job": run.command, "slots": run.indices,
                                 "since": wall - (now - run.started), "began": run.began}
                                for run in sorted(s.runs, key=lambda r: r.indices)]}
                      for s in d.slots]}


class Dispatcher:
    """Runs jobs on slots for a policy (QueueMode or BroadcastMode): owns the
    loop and wires the parts together (see the section comment). The only
    place that makes a Run, ends one, and decides to stop or exit."""

    def __init__(self, options, slots, queue, policy_class, journal):
        self.options = options
        self.journal = journal    # what to put back should this runner crash
        self.slots = slots
        self.queue = queue
        self.loop = Loop(self.on_error)
        self.printer = Printer(options.print_period, plain=options.plain, group=options.group)
        self.errors = Output(sys.stderr)
        on_disk = queue.on_disk  # a MemoryQueue writes no file
        self.records = Records(options, queue.path if on_disk else None)
        self.pool = ConnectionPool(options, slots, self.loop, self.on_master)
        self.gate = QueueGate(queue, self.loop, self.schedule, journal, lambda: bool(self.runs))
        self.monitor = Monitor(self)
        self.policy = policy_class(self)
        self.pool.reconnect = self.policy.reconnect
        self.runs = set()
        self.exiting = set()      # runs whose pipes closed before their process exited
        self.agents = set()       # every Agent not closed yet
        self.capped = set()       # masters whose host limits their sessions
        self.spawned = itertools.count(1)  # see Run.order
        self.spawners = []        # every Spawner not reaped yet (local jobs)
        self.succeeded = 0
        self.failures = []        # (slot label, command, status) of every failed job
        self.missed = []          # broadcast: (slot label, command) of steps a host did not
                                  # run, lost or never reached (command None: every one)
        self.stop_level = 0       # 0, DRAIN, CANCEL or HURRY
        self.exit_code = None     # set when the run must end with this code
        self.exiting_phase = False  # the work is over: putting back, closing masters
        self.exit_started = None
        self.done = False
        self.fill_wanted = False
        self.paused = False       # job pipes unregistered: stdout is not being read
        self.loop.after_round.append(self.advance)

    # -- the parts' events ----------------------------------------------------

    def schedule(self):
        """Ask for fill() once this round of the loop is over, so that jobs
        finishing together are replaced under one lock and one write."""
        self.fill_wanted = True

    def usable_slots(self):
        return [s for s in self.slots if s.state == "up"]

    def session_room(self):
        """id(slot.connections) -> how many more jobs its host can start now,
        for the hosts that limit sessions (see Master.room): the slot numbers
        free there beyond that would only wait for a session."""
        room = {}
        for master in self.capped:
            group = master.group
            if id(group) not in room:
                rooms = [m.room() if self.uses_agents(m) else None
                         for m in group if m.state == "up"]
                if rooms and None not in rooms:
                    room[id(group)] = sum(rooms)
        return room

    def on_master(self, master):
        self.monitor.dirty = True
        if not any(m.ever_up or m.state in ("connecting", "queued") for m in self.pool.masters):
            if self.exit_code is None:
                self.exit_code = EXIT_USAGE
            self.stop(DRAIN, "no host can be reached")
        if master.state == "up":
            self.open_agent(master)
        else:
            for run in list(master.waiting):
                run.host_lost = True
                self.unwait(run, 255)
        self.schedule()

    def on_child(self, signum):
        for run in list(self.exiting):
            self.check_exit(run)
        self.pool.on_child()
        self.reap_spawners()

    def on_error(self, owner, error):
        """What a callback raised: report it once, end that run (its job goes
        back to the queue), and go on."""
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        note_once(("bug", text), "internal error, please report it:\n%s" % text.rstrip())
        if isinstance(owner, Run):
            if owner.error is None:
                owner.error = "pegasus failed: %s: %s" % (type(error).__name__, error)
            self.force_end(owner)
        elif isinstance(owner, Agent):
            run = owner.run
            owner.abandon()
            if run is not None:
                if run.error is None:
                    run.error = "pegasus failed: %s: %s" % (type(error).__name__, error)
                self.force_end(run)
        elif owner == "fill":
            self.gate.block("no job taken after that error; trying again", QUEUE_POLL, False)

    # -- runs -----------------------------------------------------------------

    def spawn(self, slot, job, command, indices, attempt=1, avoid=()):
        """Start `job` on `slot`. A process that cannot start (no memory, no
        fds) ends as a Run with an error, so the policy decides its fate."""
        master = slot.connection()
        run = Run(slot, job, command, indices, attempt, master)
        run.order = next(self.spawned)
        run.avoid = set(avoid)
        run.on_lines = self.on_lines
        master.sessions += 1
        slot.free = [i for i in slot.free if i not in indices]
        slot.runs.add(run)
        self.runs.add(run)
        self.monitor.dirty = True
        if self.start_session(run) and run not in run.master.waiting and not run.ended:
            self.start_timeout(run)
        return run

    def begin(self, run):
        """The job is on its way: handed to a ready agent, or its own
        process spawned. Only now does it count as started: its header, its
        number and --output-dir file, its times. A run that never gets that
        far (a session the host refused, a stop first) leaves no trace of a
        start; it goes back to the queue (see end)."""
        if run.began:
            return
        run.began = True
        run.started, run.wall_start = time.monotonic(), time.time()
        self.records.started(run)
        self.printer.started(run)
        self.monitor.dirty = True

    def start_timeout(self, run):
        """--timeout counts from the spawn, or for a run that waited for a
        session, from the end of that wait."""
        if self.options.timeout:
            run.timers.append(self.loop.call_later(self.options.timeout,
                                                   lambda: self.time_out(run), owner=run))

    def start_session(self, run):
        """Start a run over an agent where its host has one (or may), else
        over a session of its own; False if it could not start."""
        master = run.master
        try:
            # A command longer than ARGV_MAX gets a session (or, locally, a
            # process) of its own: an agent or a spawner passes it in one
            # argument, which the kernel bounds.
            per_job = getattr(self.options, "session_per_job", False)
            if self.uses_agents(master) and len(run.command) <= ARGV_MAX:
                agent = self.agent_for(master)
                if agent is not None:
                    agent.start(run)
                    return True
                if master.session_cap != 0:
                    self.wait_for_session(run)
                    return True
                self.without_agents(master)  # and this run gets a session below
            if (master.socket is None and not per_job and _posix_spawn_setsid
                    and len(run.command) <= ARGV_MAX):
                run.attach(self.spawn_locally(run))
            else:
                run.spawn(*launch(self.options, master, run.command))
        except (OSError, ValueError) as e:  # ValueError: an argv the OS cannot take
            run.error = "could not start: %s" % (getattr(e, "strerror", None) or e)
            self.loop.call_later(0, lambda: self.end(run), owner=run)
            return False
        self.begin(run)
        if not self.paused:
            self.listen(run)
        if run.unsent and not run.send():
            self.loop.add_writer(run.proc.stdin.fileno(), lambda fd: self.send(run, fd), owner=run)
        return True

    # -- spawners (local jobs) -------------------------------------------------

    def spawner_for(self):
        """A spawner with no run, or a new one (OSError if none can fork)."""
        for spawner in self.spawners:
            if spawner.run is None and not spawner.lost:
                return spawner
        spawner = Spawner(self.spawned_exit)
        spawner.start(self.loop)
        self.spawners.append(spawner)
        return spawner

    def spawn_locally(self, run):
        """Hand the run to an idle spawner. One found dead (killed by what an
        earlier job left running) is let go, and another one takes it."""
        for attempt in (1, 2):  # a new one that dies too fails: could not start
            spawner = self.spawner_for()
            try:
                return spawner.spawn(run)
            except (BrokenPipeError, ConnectionResetError):
                spawner.lose()  # its own job had ended: nothing else to do
                if attempt == 2:
                    raise

    def spawned_exit(self, spawner):
        run = spawner.run
        if run is None:
            return
        if spawner.proc.error is not None and run.error is None:
            run.error = spawner.proc.error
        if run in self.exiting:
            self.check_exit(run)

    def reap_spawners(self):
        for spawner in list(self.spawners):
            if spawner.lost and spawner.run is None and spawner.reap():
                self.spawners.remove(spawner)

    # -- agents -------------------------------------------------------------------

    def uses_agents(self, master):
        """Whether jobs over `master` go to agents (else a session each)."""
        return (master.socket is not None and master.agent_ok is not False
                and not getattr(self.options, "session_per_job", False))

    def agent_for(self, master):
        """An agent of `master` with no run, or a new one; None when the
        host allows it no more sessions (see session_refused)."""
        for agent in master.agents:
            if agent.free():
                return agent
        if master.session_cap is not None and len(master.agents) >= master.session_cap:
            return None
        agent = Agent(self, master)
        agent.open()
        master.agents.append(agent)
        self.agents.add(agent)
        if self.paused:
            agent.listen(False)
        return agent

    def open_agent(self, master):
        """A master has just come up: open the agent its first job will want
        now, so that it boots on the host while the take writes the queue
        file (its syncs take milliseconds) rather than after it. One a
        master, and no more idle agents in all than queued jobs: a job may
        need several slots, a broadcast step takes a host whole, the jobs
        may go to other hosts, and each agent holds three descriptors."""
        if (not self.uses_agents(master) or self.stop_level or master.agents
                or not any(slot.free for slot in self.slots if master in slot.connections)):
            return
        if sum(1 for agent in self.agents if agent.free()) < self.queue.count:
            try:
                self.agent_for(master)
            except OSError:
                pass  # out of fds: a job's start will say so

    def agent_refused(self, run):
        """The agent saw leftovers of its last job and retired: a fresh one.
        A retired agent's session stays open while the leftovers hold its
        streams, and sshd allows 10 sessions per connection (the master's
        own, SESSIONS_PER_MASTER agents, one to spare): past one retired
        agent, the oldest is ended, and what its leftovers print is lost."""
        master = run.master
        retired = sorted((a for a in master.agents if a.state == "retired" and a.pipes),
                         key=lambda a: a.retired_at)
        for agent in retired[:-1]:
            note_once(("leftovers", master.hostname), "%s: background processes of earlier jobs "
                      "still write to their output; only the last one's is shown (sshd's "
                      "session limit)" % master.hostname)
            agent.abandon()
        run.nonce = None
        self.start_session(run)

    def wait_for_session(self, run):
        """Its master has no session for the run (the host allows no more
        on that connection). It has not started: it moves to another
        connection of its host that has one; else, in queue mode, it goes
        back to the queue, to start wherever a slot can take it (see
        QueueMode.fill); else it waits for an agent of its master, holding
        its slot, and a stop or a lost host ends it as an agent's run that
        never started (its nonce is set, its agent is None)."""
        run.agent, run.nonce = None, b""
        self.cancel_timers(run)  # (its --timeout: it starts again with the run)
        other = None if self.stop_level else self.connection_with_room(run)
        if other is not None:
            run.master.sessions -= 1
            run.master, other.sessions = other, other.sessions + 1
            run.nonce = None
            self.start_session(run)
            return
        run.master.waiting.append(run)
        if self.policy.unstarted_go_back and (self.stop_level or run.master.session_cap != 0):
            self.requeue(run)
        elif run.master.session_cap == 0:
            self.without_agents(run.master)  # (which starts the waiting runs)

    def requeue(self, run):
        """A run that waits for a session goes back to the queue unstarted."""
        run.requeued = True
        self.unwait(run, -signal.SIGTERM)

    def connection_with_room(self, run):
        """Another master of the run's host that can start it now, if any."""
        for master in run.slot.connections:
            if (master is not run.master and master.alive() and self.uses_agents(master)
                    and not master.waiting and master.room() != 0):
                return master
        return None

    def without_agents(self, master):
        """The host refuses every session on the master's connection but
        the master's own (MaxSessions 1): its jobs get an ssh session each,
        which ssh opens on a connection of its own."""
        master.agent_ok = False
        note_once(("agent", master.hostname), "%s refuses every session beside its "
                  "connection's own (sshd's MaxSessions): one ssh login per job there "
                  "instead" % master.hostname)
        while master.waiting:
            run = master.waiting.popleft()
            run.agent, run.nonce = None, None
            if self.start_session(run):
                self.start_timeout(run)

    def serve_waiting(self, master):
        """Runs waiting for a session of `master` take its free agents, or
        new ones while the host allows them."""
        if master.session_cap == 0 and master.waiting:
            self.without_agents(master)
        while master.waiting and master.alive():
            try:
                agent = self.agent_for(master)
            except OSError:
                return  # out of fds: a later end makes room
            if agent is None:
                return
            run = master.waiting.popleft()
            agent.start(run)
            self.start_timeout(run)

    def unwait(self, run, code):
        """End a run that waits for a session (see wait_for_session) with
        `code` as its exit status; False if it does not wait."""
        if run not in run.master.waiting:
            return False
        run.master.waiting.remove(run)
        run.agent_code = code
        self.check_exit(run)
        return True

    def session_refused(self, agent, was):
        """Whether the host refused the agent's session, its connection
        having as many as sshd allows (MaxSessions, 10 by default): the
        master then opens no more agents than it has now. (Some of those
        may still be opening, and be refused in turn: each refusal lowers
        the count to what is left.)"""
        master = agent.master
        if was != "starting" or not agent.failure or "refused" not in agent.failure or (
                agent.session.master_lost or not master.alive()):
            return False
        master.session_cap = len(master.agents)
        self.capped.add(master)
        note_once(("sessions", master.hostname), "%s refuses more sessions on one connection "
                  "(sshd's MaxSessions): no more jobs at a time there than it allows"
                  % master.hostname)
        return True

    def agent_closed(self, agent, was):
        master, run = agent.master, agent.run
        master.agents.remove(agent)
        self.agents.discard(agent)
        self.close_pool()
        agent.run = None
        refused = self.session_refused(agent, was)
        if refused and run is not None and run.agent_code is None:
            self.wait_for_session(run)
        self.serve_waiting(master)  # (a session may be free now)
        if master.session_cap is not None:
            self.schedule()  # (and so may a slot be: see QueueMode.fill)
        if refused:
            return
        code = agent.exit_status()
        if agent.session.fallback or (was == "starting" and code != 255
                                      and master.agent_ok is None):
            # No bash there, or it broke before it could run anything.
            master.agent_ok = False
            note_once(("agent", master.hostname), "%s: cannot run pegasus's agent (%s); one "
                      "ssh session per job there instead" % (master.hostname, agent.error()))
        if run is None or run.agent_code is not None:
            return
        if was == "starting" and master.agent_ok is False:
            run.agent, run.nonce = None, None
            self.start_session(run)
            return
        if (was in ("starting", "busy") and not agent.job_started()
                and not agent.session.master_lost and not run.agent_restarted):
            # Killed before it started the job (by an earlier job, say):
            # the job never ran, so a fresh agent gets it, once.
            run.agent_restarted = True
            run.agent, run.nonce = None, None
            self.start_session(run)
            return
        run.agent_code = 255  # its session ended under it: see check_exit
        run.host_lost = agent.session.master_lost  # known for sure: no timing guess
        self.check_exit(run)

    def on_leftover(self, run, fd, data, head, stop):
        self.printer.leftover(run, joined(data, head, stop))

    def listen(self, run):
        for fd in run.open_fds:
            self.loop.add_reader(fd, lambda fd, r=run: self.read(r, fd), owner=run)

    def send(self, run, fd):
        if run.cancelled or run.send():
            self.loop.remove(fd)

    def on_lines(self, run, fd, data, head, stop):
        self.printer.lines(run, fd, data, head, stop)
        self.records.lines(run, data, head, stop)

    def read(self, run, fd):
        if run.read(fd):
            return
        self.loop.remove(fd)
        run.open_fds.pop(fd).close()
        if not run.open_fds:
            self.check_exit(run)

    def check_exit(self, run):
        if run.ended:
            return
        if run.nonce is None and run.proc.poll() is None:
            self.exiting.add(run)  # SIGCHLD will tell when it exits
            return
        self.exiting.discard(run)
        run.close_stdin()
        if self.maybe_host_lost(run):
            # Wait a moment: if the master goes too, the host was lost, not the
            # job. It has ended: no timeout or escalation may act on it meanwhile.
            self.cancel_timers(run)
            self.loop.call_later(HOST_CHECK_DELAY, lambda: self.end(run), owner=run)
        else:
            self.end(run)

    def maybe_host_lost(self, run):
        """An end that a dying host also gives: 255 (ssh's own failure, or the
        job's status), or over an agent a death by signal (128+n: a host
        going down kills the job, and the runner may still report it)."""
        code = run.exit_code()
        return bool(run.master.socket) and not run.cancelled and code is not None and (
            code == 255 or (run.nonce is not None and code > 128))

    def end(self, run):
        if run.ended:
            return
        run.ended = True
        if self.maybe_host_lost(run):
            run.host_lost = run.host_lost or not run.master.alive()
        self.cancel_timers(run)
        self.runs.discard(run)
        self.exiting.discard(run)
        if run in run.master.waiting:
            run.master.waiting.remove(run)
        run.master.sessions -= 1
        if isinstance(run.proc, SpawnedProcess):
            run.proc.spawner.run = None  # free for the next job: no signal is for this one now
            self.reap_spawners()
        run.slot.runs.discard(run)
        run.slot.free = sorted(run.slot.free + run.indices)
        if not run.began and not (run.requeued or run.cancelled or run.host_lost):
            self.begin(run)  # it failed before it could start: shown, and counted
        if run.began:
            self.printer.ended(run)
            self.records.ended(run)
        self.policy.run_ended(run)
        self.monitor.ended(run)  # (after the policy has counted it)
        self.schedule()

    def cancel_timers(self, run):
        """Its --timeout and cancel escalations act no more."""
        for timer in run.timers:
            self.loop.cancel(timer)
        run.timers = []

    def cancel(self, run):
        """Cancel a run (a stop): its job goes back to the queue."""
        if not (run.cancelled or run.ended or run.timed_out):
            run.cancelled = True
            self.terminate(run)

    def time_out(self, run):
        """--timeout: the job is ended as a cancel would end it, and fails."""
        if not (run.cancelled or run.ended):
            run.timed_out = True
            self.terminate(run)

    def terminate(self, run):
        """TERM to the job's process group now (locally; on a host, its
        wrapper's watcher does it when its stdin closes), KILL after
        CANCEL_GRACE, and CANCEL_FORCE later end the session from this side,
        for a host that does not answer (a hung login shell, say)."""
        if self.unwait(run, -signal.SIGTERM):
            return
        run.close_stdin()
        if run.proc is not None and run.master.socket is None:
            signal_group(run.proc, signal.SIGTERM)
        run.timers.append(self.loop.call_later(CANCEL_GRACE, lambda: self.escalate(run),
                                               owner=run))

    def escalate(self, run):
        if run.master.socket is None and run.proc is not None:
            signal_group(run.proc, signal.SIGKILL)
        run.timers.append(self.loop.call_later(CANCEL_FORCE, lambda: self.force_end(run),
                                               owner=run))

    def force_end(self, run):
        """End a run now, whatever its job does: kill its process (group),
        stop reading pipes that something outside its group still holds."""
        if run.ended:
            return
        run.forced = True
        if run.nonce is not None:
            agent = run.agent
            if agent is not None and agent.run is run:
                agent.run = None
                agent.abandon()  # its EOF makes the agent end the job's group
            if run.agent_code is None:
                run.agent_code = -signal.SIGKILL
            self.end(run)
            return
        if run.proc is None:
            self.end(run)
            return
        signal_group(run.proc, signal.SIGKILL)
        run.close_stdin()
        for fd in list(run.open_fds):
            if not self.paused:
                self.loop.remove(fd)
            run.open_fds.pop(fd).close()
        self.check_exit(run)

    def record(self, run):
        """Count a finished run; True if it succeeded."""
        if run.succeeded():
            self.succeeded += 1
            return True
        self.failures.append((run.label, run.command, "%s after %s" % (
            run.status(), duration(time.monotonic() - run.started))))
        return False

    # -- stopping and exiting ---------------------------------------------------

    def on_signal(self, signum):
        if self.exiting_phase:
            level, why = HURRY, "asked again"
        elif signum == signal.SIGINT:
            level, why = self.stop_level + 1, "Ctrl-C"
        elif signum == signal.SIGUSR1:
            level, why = DRAIN, "asked to stop (pegasus.py stop)"
        else:
            level = max(CANCEL, self.stop_level + 1)
            why = {signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP (the terminal closed)",
                   signal.SIGUSR2: "asked to stop now (pegasus.py stop --now)"}[signum]
        if signum != signal.SIGUSR1:
            self.exit_code = EXIT_INTERRUPTED
        self.stop(min(level, HURRY), why)

    def stop(self, level, why):
        """The one stop path. DRAIN: start no job; CANCEL: cancel the running
        ones; HURRY: kill them now and give up waiting for anything."""
        if level <= self.stop_level:
            return
        self.stop_level = level
        unstarted = [run for run in self.runs if run in run.master.waiting
                     and self.policy.unstarted_go_back]
        running = sum(1 for run in self.runs if run.began)
        starting = len(self.runs) - len(unstarted) - running  # (sessions still opening)
        jobs = running_jobs(running, starting)
        if not running + starting or self.exiting_phase:
            note("%s: stopping" % why)
        elif level == DRAIN:
            again = "Ctrl-C again" if why == "Ctrl-C" else "pegasus.py stop --now"
            note("%s: no new jobs; waiting for %s to finish (%s to cancel them)"
                 % (why, jobs, again))
        elif level == CANCEL:
            note("%s: cancelling %s (SIGTERM, then SIGKILL after %d s)"
                 % (why, jobs, CANCEL_GRACE))
        else:
            note("%s: killing %s now" % (why, jobs))
        self.policy.stopping()
        for run in unstarted:
            self.requeue(run)
        for run in list(self.runs):
            if level >= CANCEL:
                self.cancel(run)
            if level >= HURRY:
                self.force_end(run)
        if level >= CANCEL:
            for agent in list(self.agents):
                if agent.run is None:  # idle, or waiting for leftovers: no more
                    agent.abandon()
        if level >= HURRY:
            self.gate.give_up()
            self.pool.kill_all()
            self.printer.output.drop()
            self.errors.drop()
        # Saved now: `pegasus.py stop` waits for it, to say how many jobs ran.
        self.monitor.stop_taken = {"level": level, "running": running, "starting": starting}
        self.monitor.save()
        self.schedule()

    def advance(self):
        """After each round of the loop: fill free slots, or move towards the
        exit; write what this round printed; then see whether all is done
        (after the write: a last line still in the buffer would otherwise
        hold the exit until the next timer, 0.25 s)."""
        if not self.exiting_phase:
            if self.stop_level:
                if not self.runs:
                    self.begin_exit()
            elif self.fill_wanted:
                self.fill_wanted = False
                self.loop.call(self.fill, "fill")
            self.throttle()
        self.printer.flush()
        self.output_failed()
        if self.exiting_phase and self.gate.settled() and self.pool.closed() and (
                not self.agents) and (
                not self.printer.backlog() or self.output_given_up()):
            self.done = True

    def fill(self):
        self.monitor.dirty = True  # the queued count may have changed
        if self.policy.fill() and not self.runs:
            self.begin_exit()

    def output_failed(self):
        """Whether stdout could not be written (a full disk); said once, at
        once: the jobs go on, and their output is lost from then on."""
        failure = self.printer.output.failure
        if failure:
            note_once("output", "cannot write the output: %s; the jobs go on, and what they "
                      "print is lost" % failure)
        return bool(failure)

    def output_given_up(self):
        """Stopped by a signal, pegasus waits OUTPUT_EXIT_WAIT at most for a
        reader that does not read (a finished run waits as long as it takes)."""
        return self.stop_level >= HURRY or (
            self.stop_level >= CANCEL and time.monotonic() >= self.exit_started + OUTPUT_EXIT_WAIT)

    def begin_exit(self):
        self.exiting_phase = True
        self.exit_started = time.monotonic()
        self.loop.call_later(OUTPUT_EXIT_WAIT, lambda: None, owner="exit")  # look again then
        self.policy.wind_up()
        self.gate.finish()
        for agent in list(self.agents):
            if agent.state == "starting":
                agent.abandon()  # no job to lose; its host may hang in a login script
            else:
                agent.quit()  # a retired one waits for its job's leftovers, as a run would
        self.close_pool()
        self.monitor.dirty = True

    def close_pool(self):
        """At the exit, once no agent is left: their sessions ride on the masters."""
        if self.exiting_phase and not self.agents and not self.pool.closing:
            self.pool.close()

    def throttle(self):
        """Stop reading jobs' output while stdout does not take it (their
        writes block, as they would on a pipe), and read again once it does.
        Once stopping, output goes instead, so that no pipe holds a job up."""
        backlog = self.printer.backlog()
        if not self.paused and backlog > OUTPUT_HIGH and self.stop_level < CANCEL:
            self.paused = True
            for run in self.runs:
                for fd in run.open_fds:
                    self.loop.remove(fd)
            for agent in self.agents:
                agent.listen(False)
        elif self.paused and (backlog < OUTPUT_LOW or self.stop_level >= CANCEL):
            self.paused = False
            if self.stop_level >= CANCEL:
                self.printer.output.drop()
            for run in self.runs:
                self.listen(run)
            for agent in self.agents:
                agent.listen(True)

    # -- the whole run ----------------------------------------------------------

    def run(self):
        global _status, _printer, _errors
        raise_fd_limit()
        self.loop.on_signal(signal.SIGCHLD, self.on_child)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                       signal.SIGUSR1, signal.SIGUSR2):
            self.loop.on_signal(signum, self.on_signal)
        self.loop.on_signal(signal.SIGWINCH, self.printer.resize)
        self.printer.output.attach(self.loop)
        self.errors.attach(self.loop)
        _printer, _errors = self.printer, self.errors
        if sys.stderr.isatty():
            _status = StatusLine(self.errors, sys.stderr)
        try:
            self.pool.start()
            self.monitor.tick()  # after start(): `s` shows the hosts connecting
            self.schedule()
            self.loop.run(lambda: self.done)
        finally:
            self.shut_down()
        return self.report()

    def shut_down(self):
        """After the loop (or if it broke): nothing may be left running."""
        global _status, _printer, _errors
        for run in list(self.runs):
            if run.proc is not None:
                signal_group(run.proc, signal.SIGKILL)
                run.proc.wait()
            for pipe in run.open_fds.values():
                pipe.close()
            run.close_stdin()
        for agent in list(self.agents):
            agent.discard()
        self.close_spawners()
        self.pool.cleanup()
        self.printer.flush()
        if _status is not None:
            _status.clear()
        _status = _printer = _errors = None
        self.errors.detach()  # last attached, first detached: 2>&1 shares one file
        self.printer.output.detach()  # description, whose flags this one saved first
        self.loop.close()
        self.records.close()
        self.gate.give_up()
        if self.monitor.state is not None:
            self.monitor.state.remove()  # last: `s` sees the run until it is over

    def close_spawners(self):
        """EOF to every spawner; they exit at once (their jobs are over), and
        are reaped here if they do within a second."""
        deadline = time.monotonic() + 1
        for spawner in self.spawners:
            spawner.close()
        while self.spawners and time.monotonic() < deadline:
            self.spawners = [s for s in self.spawners if not s.reap()]
            if self.spawners:
                time.sleep(0.005)

    def report(self):
        self.policy.report()
        for label, command, status in self.failures:
            note("failed: %s %s: %s" % (label, shown(command), status))
        total = self.succeeded + len(self.failures)
        note("%d job%s run in %s: %d succeeded, %d failed%s" % (
            total, plural(total), duration(time.monotonic() - self.monitor.started_at),
            self.succeeded, len(self.failures), self.missed_text()))
        if self.exit_code is not None:
            return self.exit_code
        if self.output_failed():
            return EXIT_USAGE
        return EXIT_FAILED if self.failures or self.missed else EXIT_OK

    def missed_text(self):
        """The summary's count of the broadcast steps that hosts did not run:
        each counts as a failure for the exit status, but none ran."""
        lost = sum(1 for _, command in self.missed if command is not None)
        never = len(self.missed) - lost
        parts = (["%d on hosts lost" % lost] if lost else []) + (
            ["every job on %d host%s never reached" % (never, plural(never))] if never else [])
        return "; not run: " + ", ".join(parts) if parts else ""


class QueueMode:
    """Queue mode: each job once, on the next free slot. A job whose host was
    lost goes back to the queue; a failed job is retried (--retries) on
    another slot when there is one.

    Jobs that need several slots (`slots: 4`) go to the host where they fit
    most tightly. When the job at the head of the queue fits nowhere yet, one
    host is reserved for it (the one with the most free slots, and it stays
    reserved until the job starts): smaller jobs behind it may start on other
    hosts (backfill) but never on that one, so the head job waits at most for
    the jobs already running there. --strict-fifo starts nothing behind it.
    """

    reconnect = True
    # A stop puts back the jobs that wait for a session (see
    # Dispatcher.wait_for_session): they have not started.
    unstarted_go_back = True

    def __init__(self, dispatcher):
        self.d = dispatcher
        self.retries = []        # [job, attempt, failed slot labels, last run] waiting for a slot
        self.reservation = None  # (job key, slot) kept for a waiting head job
        self.oversized = set()   # keys of jobs no host can hold, already reported
        self.largest = max(slot.capacity for slot in dispatcher.slots)
        self.waiting = False     # a queued job could not start for want of a slot
        self.cut_short = []      # cancelled runs, to go back in the order they started
        self.start_errors = {}   # job key -> runs of it that could not start
        self.ahead = collections.deque()  # [job, when taken, None or see take_returned]
        self.returned = []       # runs that never started, this round (give_back_unstarted)
        self.ahead_timer = None  # the look at ahead jobs that wait too long
        self.room = {}           # see Dispatcher.session_room, as of this fill()
        self.pace = None         # how long runs take, on average (recent ones count most)
        self.paced = 0           # runs that pace has seen end

    def fill(self):
        """Start what can start; True when all the work is done."""
        d = self.d
        d.gate.put_back([])  # jobs of lost hosts that found the queue locked
        self.take_returned()
        self.room = d.session_room()
        free = {slot: list(slot.free) for slot in d.usable_slots()
                if slot.free and self.room.get(id(slot.connections)) != 0}
        self.start_retries(free)
        self.start_ahead(free)
        self.waiting = bool(d.queue.count)  # until a walk of the queue says otherwise
        if any(free.values()) and not d.gate.blocked:
            self.waiting = False  # choose() sets it when it leaves a job that could run
            now = time.monotonic()
            for (slot, indices, command), job in d.gate.take(
                    self.chooser(free), starts=lambda choice: choice[0] is not None):
                if slot is None:
                    self.ahead.append([job, now, None])
                else:
                    d.spawn(slot, job, command, indices)
        self.watch_ahead()
        if d.gate.blocked:
            return False  # the retry asks for fill() again
        if (not self.waiting and not d.runs and not self.retries and not d.gate.pending
                and not self.ahead and not d.queue.settling() and not d.options.daemon):
            return True   # however many hosts are still connecting
        if any(free.values()):
            d.gate.watch()
        return False

    def use(self, free, slot, job):
        """`job` goes to `slot`: its slot numbers are taken, and on a host
        that limits its sessions, one of the sessions it has to spare."""
        del free[slot][:job.slots]
        key = id(slot.connections)
        if key in self.room:
            self.room[key] -= 1
            if not self.room[key]:
                for other in free:
                    if other.connections is slot.connections:
                        free[other] = []

    def place(self, job, free, avoid=()):
        """The slot (and slot numbers) where `job` fits most tightly, or None."""
        fits = [slot for slot, numbers in free.items()
                if len(numbers) >= job.slots and slot.label not in avoid]
        if not fits:
            return None
        slot = min(fits, key=lambda slot: (len(free[slot]), slot.index))
        return slot, free[slot][:job.slots]

    def chooser(self, free):
        """choose(job) for QueueFile.take: see the class docstring. Once no
        slot is free, it may take jobs ahead (see ahead_wanted)."""
        reserved = []  # the slot held for the first job that does not fit
        ahead = [0 if self.d.stop_level else self.ahead_wanted()]  # how many more to take ahead

        def choose(job):
            open_slots = {s: n for s, n in free.items() if n and s not in reserved}
            if not open_slots:
                if ahead[0] > 0 and job.slots == 1 and not reserved:
                    render_job(job, self.d.usable_slots()[0])  # a broken one stays
                    ahead[0] -= 1
                    return None, None, None
                self.waiting = True
                raise StopScan
            if job.slots > self.largest:
                self.report_oversized(job)
                return None
            found = self.place(job, open_slots)
            if found is None:
                self.waiting = True
                if self.d.options.strict_fifo:
                    raise StopScan
                if not reserved:
                    reserved.append(self.reserve(job))
                return None
            slot, indices = found
            command = render_job(job, slot, indices)
            self.use(free, slot, job)
            if self.reservation and self.reservation[0] == job.key():
                self.reservation = None
            return slot, indices, command
        return choose

    def ahead_wanted(self):
        """How many jobs to take ahead of free slots: none, unless runs have
        been ending within AHEAD_WINDOW (a burst of short jobs). Then each
        take brings up to AHEAD_MAX jobs a slot, and most runs need no take
        of their own (a take writes queue.yaml, consumed.yaml and the
        journal, and syncs them: ~1.5 ms). One that waits longer than
        AHEAD_HOLD goes back (watch_ahead), and all do at a stop."""
        slots = self.d.usable_slots()
        if (not slots or self.pace is None or self.pace >= AHEAD_WINDOW
                or self.paced < sum(s.capacity for s in slots) or self.reservation):
            return 0
        per_slot = min(AHEAD_MAX, int(AHEAD_WINDOW / max(self.pace, 1e-6)))
        return per_slot * sum(s.capacity for s in slots) - len(self.ahead)

    def start_ahead(self, free):
        """Start jobs taken ahead, in queue order, on free slots; consumed.yaml
        lists them now."""
        started = []
        while self.ahead:
            found = self.place(self.ahead[0][0], free)
            if found is None:
                break
            job, _, returned = self.ahead.popleft()
            slot, indices = found
            try:
                command = render_job(job, slot, indices)
            except PegasusError:
                self.d.gate.put_back([job])  # the usual take will say why
                continue
            self.use(free, slot, job)
            if returned is None:  # (consumed.yaml lists a returned one already)
                started.append(job)
            self.d.spawn(slot, job, command, indices)
        self.d.queue.record_started(started)

    def watch_ahead(self):
        """Jobs taken ahead that wait more than AHEAD_HOLD (the runs got
        long: the pace that took them no longer holds) go back to the head
        of the queue, where lock mode and other runners can see them. One
        timer, set when the first of them is due; it looks again then."""
        if self.ahead_timer is None and self.ahead:
            wait = self.ahead[0][1] + AHEAD_HOLD - time.monotonic()
            self.ahead_timer = self.d.loop.call_later(max(0.0, wait), self.check_ahead,
                                                      owner="fill")

    def check_ahead(self):
        self.ahead_timer = None
        if self.ahead and self.ahead[0][1] + AHEAD_HOLD <= time.monotonic():
            self.give_back_ahead()
        self.watch_ahead()

    def give_back_ahead(self):
        self.take_returned()
        if self.ahead:
            self.d.gate.put_back([job for job, _, _ in self.ahead])
            self.ahead.clear()

    def give_back_unstarted(self, run):
        """A run that never started (its session refused, a stop first): its
        job, taken before those taken ahead, goes before them, and starts on
        the next slot that can take it. No rewrite of the queue file, and
        consumed.yaml lists it once. After a stop, or for a job that needs
        several slots (see reserve()), it goes back to the head of the queue."""
        if self.d.stop_level or run.job.slots != 1:
            self.d.gate.put_back([run.job])
        else:
            self.returned.append(run)

    def take_returned(self):
        """The unstarted runs of this round go ahead of the jobs taken ahead,
        among those of earlier rounds in the order they were spawned (their
        entries' third item, run.order)."""
        if self.returned:
            now = time.monotonic()
            front = [[run.job, now, run.order] for run in self.returned]
            while self.ahead and self.ahead[0][2] is not None:
                front.append(self.ahead.popleft())
            front.sort(key=lambda entry: entry[2])
            self.ahead.extendleft(reversed(front))
            self.returned = []

    def stopping(self):
        """A stop: no job starts any more, and those taken ahead go back now."""
        self.give_back_ahead()

    def reserve(self, job):
        """The slot held for a head job that fits nowhere now; sticky, so
        that backfill cannot keep moving it out of reach."""
        if self.reservation and self.reservation[0] == job.key() \
                and self.reservation[1].state == "up":
            return self.reservation[1]
        candidates = [s for s in self.d.usable_slots() if s.capacity >= job.slots]
        if not candidates:
            return None
        slot = max(candidates, key=lambda s: (len(s.free), -s.index))
        self.reservation = (job.key(), slot)
        return slot

    def report_oversized(self, job):
        if job.key() not in self.oversized:
            self.oversized.add(job.key())
            where = self.d.queue.path
            line = next((entry.line for entry in self.d.queue.entries
                         if job.command in entry.spec["command"]
                         and int(entry.spec.get("slots", ["1"])[0]) == job.slots), None)
            if line is not None:
                where += ":%d" % line
            note("%s: job %s needs %d slots, but the largest host has %d; it stays in "
                 "the queue" % (where, shown(job.command), job.slots, self.largest))

    def start_retries(self, free):
        """Start waiting retries, each on a slot it has not failed on when
        there is one."""
        for item in list(self.retries):
            job, attempt, avoid, last = item
            found = self.place(job, free, avoid)
            others_exist = any(s.label not in avoid and s.state != "down"
                               and s.capacity >= job.slots for s in self.d.slots)
            if found is None and not others_exist:
                found = self.place(job, free)
            if found is None:
                continue  # wait for a slot it has not failed on
            slot, indices = found
            try:
                command = render_job(job, slot, indices)
            except PegasusError as e:
                note("cannot retry: %s" % e)
                continue
            self.retries.remove(item)
            self.use(free, slot, job)
            self.d.spawn(slot, job, command, indices, attempt, avoid)

    def run_ended(self, run):
        d = self.d
        if run.requeued or (run.cancelled and not run.began):
            self.give_back_unstarted(run)
            return
        if run.began:
            took = time.monotonic() - run.started
            self.pace = took if self.pace is None else 0.8 * self.pace + 0.2 * took
            self.paced += 1
        if run.cancelled and not run.succeeded():
            self.cut_short.append(run)  # back together at exit, in their order
        elif run.error is not None:
            self.start_failed(run)
        elif run.host_lost:
            note("%s lost its host; %s goes back to the head of %s"
                 % (run.label, shown(run.command), d.queue.path))
            d.gate.put_back([run.job])
        elif not run.succeeded() and run.attempt <= d.options.retries and not d.stop_level:
            note("%s %s failed (%s); retry %d of %d" % (
                run.label, shown(run.command), run.status(), run.attempt,
                d.options.retries))
            self.retries.append([run.job, run.attempt + 1, run.avoid | {run.slot.label}, run])
        else:
            if not d.record(run):
                d.records.failed(run.job)
                if d.options.error_aborts:
                    d.stop(DRAIN, "%s failed on %s (-e)" % (shown(run.command), run.label))
            d.journal.ended(run.job)

    def start_failed(self, run):
        """A run that could not start, or that pegasus itself broke: its job
        goes back to the queue, up to START_TRIES times, then counts failed."""
        key = run.job.key()
        self.start_errors[key] = self.start_errors.get(key, 0) + 1
        if self.start_errors[key] >= START_TRIES or self.d.stop_level:
            if not self.d.record(run):
                self.d.records.failed(run.job)
            self.d.journal.ended(run.job)
            return
        note("%s %s: %s; it goes back to the head of %s" % (
            run.label, shown(run.command), run.error, self.d.queue.path))
        self.d.gate.put_back([run.job])
        self.d.gate.block("taking no job for %d s" % WRITE_RETRY, WRITE_RETRY, False)

    def wind_up(self):
        """At exit: retries not run count as failed; cancelled jobs go back
        to the head of the queue in the order they had started, before any
        taken ahead."""
        self.give_back_ahead()
        for job, attempt, avoid, last in self.retries:
            self.d.record(last)
            self.d.records.failed(job)
            self.d.journal.ended(job)
        self.retries = []
        self.cut_short.sort(key=lambda run: run.sequence)
        self.d.gate.put_back([run.job for run in self.cut_short])

    def report(self):
        d = self.d
        if self.cut_short:
            note("cut short and %s %s: %s" % (
                "not yet put back in" if d.gate.gave_up else "put back at the head of",
                d.queue.path, ", ".join(shown(run.command) for run in self.cut_short)))
        # Hosts whose logins failed, and those still logging in or waiting
        # to at the end (a host that accepts connections and then says
        # nothing, within CONNECT_WAIT), which close() ended quietly.
        up = {m.hostname for m in d.pool.masters if m.ever_up}
        never = sorted({m.hostname for m in d.pool.masters} - up, key=natural)
        if never:
            note("never reached: %s" % ", ".join(never))
        left = d.gate.queued(fresh=True)
        problem = d.gate.problem()
        if problem:
            note("the jobs in %s are not counted (it cannot be read: %s)" % (d.queue.path, problem))
        elif d.stop_level and left:
            note("%d job%s left in %s" % (left, plural(left), d.queue.path))


class BroadcastMode:
    """Broadcast mode: each job on every slot; the next starts when all are done."""

    reconnect = False
    unstarted_go_back = False  # a drained step still runs on every slot

    def __init__(self, dispatcher):
        self.d = dispatcher
        self.step_failed = []  # labels of the slots that failed this step
        self.step_job = None   # the job of this step
        self.cut_short = []    # this step's cancelled runs: the step goes back whole
        self.missed = {}       # slot label -> the jobs it missed once its host was lost

    def stopping(self):
        pass  # nothing is taken ahead: a step starts once all slots are free

    def fill(self):
        d = self.d
        if d.runs or d.gate.blocked or not d.pool.settled():
            return False
        slots = d.usable_slots()
        if not slots:
            return True
        if self.step_failed and self.step_job is not None:
            d.records.failed(self.step_job)  # once, however many hosts it failed on
            self.step_job = None
        if self.step_failed and not d.options.ignore_errors:
            note("stopping: the last job failed on %s (use -i to go on)"
                 % ", ".join(self.step_failed))
            return True
        self.step_failed = []
        taken = d.gate.take(self.chooser(slots))
        if taken:
            commands, job = taken[0]
            self.step_job = job
            for slot in d.slots:
                if slot.ever_up and slot not in slots:
                    self.missed.setdefault(slot.label, []).append(job.command)
            for slot, command in zip(slots, commands):
                d.spawn(slot, job, command, list(range(slot.capacity)))
            return False
        if d.gate.blocked:
            return False
        if d.options.daemon or d.queue.settling():
            d.gate.watch()
            return False
        return True

    def chooser(self, slots):
        """Take the head job alone. A step takes each host whole, whatever
        slots the job asks for; every slot must render it before it is taken."""
        def choose(job):
            if choose.taken:
                raise StopScan
            choose.taken = True
            return [render_job(job, slot, list(range(slot.capacity))) for slot in slots]
        choose.taken = False
        return choose

    def run_ended(self, run):
        d = self.d
        if run.cancelled and not run.succeeded():
            self.cut_short.append(run)  # not a failure: the step was not let finish
            return
        if run.host_lost:
            note("%s lost its host during %s" % (run.label, shown(run.command)))
        elif (not run.succeeded() and not run.cancelled and run.error is None
              and run.attempt <= d.options.retries and not d.stop_level):
            note("%s %s failed (%s); retry %d of %d" % (
                run.label, shown(run.command), run.status(), run.attempt,
                d.options.retries))
            d.spawn(run.slot, run.job, run.command, run.indices, run.attempt + 1)
            return
        if not d.record(run):
            self.step_failed.append(run.label)
        if not d.runs and not self.cut_short:
            d.journal.ended(run.job)  # the step is over, on every host

    def wind_up(self):
        """At exit: a step cut short goes back to the head of the queue, to
        run again on every host (lock-step: the next must not run first)."""
        if self.cut_short and self.step_job is not None:
            self.d.gate.put_back([self.step_job])
        elif self.step_failed and self.step_job is not None:
            self.d.records.failed(self.step_job)
        self.step_job = None

    def report(self):
        if self.cut_short:
            note("cut short on %d host%s and %s %s: %s" % (
                len(self.cut_short), plural(len(self.cut_short)),
                "not yet put back in" if self.d.gate.gave_up else "put back at the head of",
                self.d.queue.path, shown(self.cut_short[0].job.command)))
        # Broadcast is for every host: one that never connected missed every
        # job, one whose host was lost (with -i) every job after.
        for slot in self.d.slots:
            if not slot.ever_up:
                note("not run on %s: unreachable" % slot.label)
                self.d.missed.append((slot.label, None))
        for label, commands in self.missed.items():
            note("not run on %s, whose host was lost: %s" % (
                label, ", ".join(shown(command) for command in commands)))
            self.d.missed += [(label, command) for command in commands]


def short_temp_dir():
    # Control sockets must fit in 104 bytes (macOS), and ssh adds a 17-byte
    # suffix while it binds one: use $TMPDIR only when it is short enough
    # (macOS's long per-user one is not).
    directory = tempfile.gettempdir()
    return directory if len(directory) <= 60 else "/tmp"


def load_slots(options):
    """The slots from -H, --slurm or the hosts file; or this machine alone."""
    if options.host:
        return label_copies(hosts_from_list(options.host, "-H"), "-H")
    if options.slurm:
        return label_copies(slurm_hosts(os.environ), "SLURM_JOB_NODELIST")
    path = options.hosts_file
    if path is None:
        path = "hosts.yaml"
        if not os.path.exists(path):
            note("no hosts.yaml here: running jobs on this machine, one at a time "
                 "(write hosts.yaml, or give hosts with -H, to use others)")
            return [Slot(0, "localhost", {})]
    return label_copies(read_hosts(path), path)


def open_queue(options, slots):
    if options.commands:
        queue = command_queue(options.commands, sys.stdin)
    else:
        queue = open_queue_file(options)
    check_queue(queue, slots, options.mode == "b")
    return queue


def command_queue(commands, stdin):
    """Commands given as arguments; "-" stands for stdin's lines, one command each."""
    jobs = []
    for command in commands:
        if command == "-":
            jobs += [Job(line) for line in stdin.read().splitlines() if line.strip()]
        elif command.strip():
            jobs.append(Job(command))
        else:
            raise PegasusError("an empty command was given")
    return MemoryQueue(jobs, "<stdin>" if commands == ["-"] else "<command line>")


def open_queue_file(options):
    path = options.queue_file
    queue = QueueFile(path, options.mode)
    if not os.path.exists(path):
        raise PegasusError("%s: no such file (write one job per line as '- command', name "
                           "another with --queue-file, or give commands as arguments)" % path)
    # A last line without its newline, just written: wait a moment for it, so
    # that a file saved so is read whole (and, broken, is an error at start),
    # but not for a writer that goes on and on: the run reads what is whole.
    with stoppable():
        queue.load()
        deadline = time.monotonic() + 2 * SETTLE
        while queue.settling() and time.monotonic() < deadline:
            time.sleep(max(0.0, min(queue.settle_at, deadline) - time.monotonic()) + 0.01)
            queue.load()
    if options.dry_run:
        return queue
    directory = os.path.dirname(os.path.abspath(path))
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PegasusError("%s: cannot write in this directory, so jobs could not be "
                           "moved from %s to consumed.yaml" % (directory, path))
    for name in (path, queue.consumed_path):
        if os.path.exists(name) and not os.access(name, os.W_OK):
            raise PegasusError("%s: not writable" % name)
    check_disk_space(path)
    return queue


@contextlib.contextmanager
def stoppable():
    """While pegasus waits before its loop runs (for a last line to settle,
    for the lock): SIGTERM and SIGHUP stop it as Ctrl-C does, exit status
    130, rather than kill it with no word (their default action)."""
    def stop(signum, frame):
        raise KeyboardInterrupt
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_disk_space(queue_path):
    """Each take rewrites the queue file beside itself: without room for
    a copy of it, no job could be taken."""
    target = queue_target(queue_path)
    try:
        st = os.statvfs(os.path.dirname(target))
        size = os.path.getsize(target) if os.path.exists(target) else 0
    except OSError:
        return
    free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    if free < size + MIN_FREE_BYTES:
        raise PegasusError("%s: too little space left on the device (%d bytes free, %d "
                           "needed): pegasus rewrites the queue file beside itself, and keeps "
                           "consumed.yaml and its journal there; free some space"
                           % (os.path.dirname(target), free, size + MIN_FREE_BYTES))


def mode_run(options, policy):
    slots = load_slots(options)
    if not all(slot.is_local for slot in slots):
        found = shutil.which(options.ssh)
        if found is None:
            raise PegasusError("cannot find %r on PATH; pegasus runs jobs through it"
                               % options.ssh)
        options.ssh = found
    queue = open_queue(options, slots)
    if options.dry_run:
        return dry_run(slots, queue, policy is BroadcastMode)
    journal, slots = start_journal(queue, slots)  # crash recovery, host claims
    try:
        return run_queue(options, policy, slots, queue, journal)
    finally:
        journal.close()


def run_queue(options, policy, slots, queue, journal):
    if not queue.entries and not options.daemon and not queue.settling():
        note("%s is empty: nothing to do" % queue.path)
        return EXIT_OK
    kind = "queue" if policy is QueueMode else "broadcast"
    note("%s mode: %d job%s queued, %d slot%s on %d host%s" % (
        kind, count_jobs(queue.entries), plural(count_jobs(queue.entries)),
        sum(s.capacity for s in slots), plural(sum(s.capacity for s in slots)),
        len({s.hostname for s in slots}), plural(len({s.hostname for s in slots}))))
    status = Dispatcher(options, slots, queue, policy, journal).run()
    if queue.on_disk:
        queue.last_look()
    return status


def dry_run(slots, queue, broadcast):
    """Show what would run; connect to nothing and change no file."""
    total = count_jobs(queue.entries)
    jobs = itertools.islice((job for entry in queue.entries for job in expand_jobs(entry.spec)),
                            DRY_RUN_SHOWN)
    print("%d slot%s:" % (len(slots), plural(len(slots))))
    for slot in slots:
        print("  " + slot.label)
    print("%d job%s in %s%s" % (total, plural(total), queue.path, ":" if total else ""))
    for number, job in enumerate(jobs, 1):
        # Queue mode: shown on the first host it fits, with its first slot
        # numbers; in a run, it goes where it fits when slots are free.
        if broadcast:
            placed = [(slot, list(range(slot.capacity))) for slot in slots]
        else:
            slot = next(s for s in slots if s.capacity >= job.slots)
            placed = [(slot, list(range(job.slots)))]
        for slot, indices in placed:
            needs = " (%d slots)" % job.slots if job.slots != 1 and not broadcast else ""
            print("  %d. %s%s %s" % (number, slot.label, needs,
                                     render_job(job, slot, indices)))
    if total > DRY_RUN_SHOWN:
        print("  ... and %d more job%s" % (total - DRY_RUN_SHOWN,
                                           plural(total - DRY_RUN_SHOWN)))
    commands = total * (len(slots) if broadcast else 1)
    print("%d command%s would run (%s mode)" % (
        commands, plural(commands), "broadcast" if broadcast else "queue"))
    return EXIT_OK


def plural(count):
    return "" if count == 1 else "s"


def natural(name):
    """A sort key that orders the numbers in names by value: node2 before node10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def running_jobs(running, starting):
    """'3 running jobs', and how many more are starting (a session that is
    still opening may yet be refused: see Dispatcher.wait_for_session)."""
    text = "%d running job%s" % (running, plural(running))
    return text + (" (and %d starting)" % starting if starting else "")


def mode_queue(options):
    return mode_run(options, QueueMode)


def mode_broadcast(options):
    return mode_run(options, BroadcastMode)


def mode_lock(options):
    """Hold the queue lock while the user edits the queue file."""
    argv = editor_argv(options.editor or os.environ.get("EDITOR") or "vim")
    check_disk_space(options.queue_file)
    lock = wait_for_lock(options.queue_file, "l")
    edited, ours = None, set()  # ours: the pipe ends not closed yet

    def close(fd):
        if fd in ours:
            ours.discard(fd)
            os.close(fd)
    try:
        try:
            edited = EditedFile(options.queue_file)
        except OSError:
            pass  # (it cannot be written: the editor will say so)
        done = os.pipe()
        ours.update(done)
        go = os.pipe()
        ours.update(go)
        # A small sh inherits the locked descriptor and waits for the editor:
        # if pegasus dies, the kernel keeps the lock until the editor exits,
        # so a save from its buffer never races with a runner. The editor
        # itself runs without it: what it leaves running in the background
        # (a shell escape, a server) cannot hold the lock after it exits.
        # It also removes the lock file, still holding the lock, so that none
        # is left behind when pegasus l was killed (see QueueLock on removal):
        # that frees the lock. Before, it says the editor is done (`done`)
        # and waits for `go` to close, for EditedFile.done() (in a
        # subshell: with pegasus gone, SIGPIPE ends that one, not the sh).
        script = ('l=$1; shift; "$@" %d>&- %d>&- %d>&-; s=$?; (echo >&%d) 2>/dev/null; '
                  'read _ <&%d; rm -f "$l"; exit $s' % (lock.fd, done[1], go[0], done[1], go[0]))
        editor = subprocess.Popen(["sh", "-c", script, "sh", lock.path] + argv
                                  + [options.queue_file], pass_fds=(lock.fd, done[1], go[0]))
        close(done[1])
        close(go[0])
        lock.describe(" (editor %s, pid %d)" % (os.path.basename(argv[0]), editor.pid))
        wait_edit(done[0], edited)
        if edited is not None:
            edited.done()  # (it closes its file)
            edited = None
        close(go[1])
        status = wait_editor(editor)
    finally:
        if edited is not None:
            os.close(edited.fd)
        for fd in list(ours):
            close(fd)
        lock.release()
    if status != 0:
        note("the editor %r failed (%s); %s is as it saved it, if it did"
             % (argv[0], "exit status %d" % status if status > 0 else "signal %d" % -status,
                options.queue_file))
    if os.path.exists(options.queue_file):
        try:
            entries, _ = parse_queue(options.queue_file, read_text(options.queue_file))
            note("%s: %d job%s queued" % (options.queue_file, count_jobs(entries),
                                           plural(count_jobs(entries))))
        except PegasusError as e:
            note("warning: %s (a running pegasus waits until it is fixed)" % e)
    return EXIT_OK if status == 0 else EXIT_FAILED


def runners_of(options):
    """The live runners of the queue file (--pid: that one), and the dead
    ones whose jobs the next run puts back."""
    runners = other_runners(options.queue_file)
    for runner in runners:
        runner.close()
    live = [r for r in runners if r.alive and options.pid in (None, r.pid)]
    dead = [r for r in runners if not r.alive]
    if not live:
        message = "no pegasus%s is running on %s" % (
            "" if options.pid is None else " pid %d" % options.pid, options.queue_file)
        if dead:
            message += "; %s crashed, and the next run on it puts back what %s left " \
                       "unfinished" % (", ".join(r.who() for r in dead),
                                       "it" if len(dead) == 1 else "they")
        raise PegasusError(message)
    return live, dead


def editor_argv(editor):
    """A path that names an executable (spaces and all) is the editor;
    else the string is split as a shell would, so "code --wait" works."""
    if os.path.isfile(editor) and os.access(editor, os.X_OK):
        return [editor]
    argv = shlex.split(editor)
    if not argv or shutil.which(argv[0]) is None:
        raise PegasusError("cannot find the editor %r (set $EDITOR or use --editor)" % editor)
    return argv


class EditedFile:
    """The queue file lock mode hands the editor, open, and what it held
    then: what the editor read. While the editor runs, what `>>` appends to
    it; when the editor is done, what a runner needs to know of its save."""

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        self.read = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        self.late = b""  # appended after the editor read it, while the file still held that

    def watch(self):
        """Look for appends (every EDIT_WATCH while the editor runs)."""
        size = os.fstat(self.fd).st_size
        if size > len(self.read) + len(self.late):
            data = os.pread(self.fd, size, 0)
            if data.startswith(self.read + self.late):  # appended to, not written over
                self.late = data[len(self.read):]

    def done(self):
        """The editor has exited. If its save replaced the file (a rename,
        as `sed -i` does), append to the old one, which no longer has a name,
        how much of it the editor read: a runner that read the old file
        before jobs were added to it carries over only what the editor did
        not read (see read_by_save), so one the user deleted stays deleted.
        If the save wrote over the file in place, what `>>` appended while
        the editor had it open would be lost: it is appended again. Nothing
        goes after half a line, where a `>>` writer's rest is to land."""
        try:
            old, new = os.fstat(self.fd), os.stat(self.path)
            data = os.pread(self.fd, old.st_size, 0)
            whole = not data or data.endswith(b"\n")
            if (new.st_dev, new.st_ino) != (old.st_dev, old.st_ino):
                if old.st_nlink == 0 and data.startswith(self.read) and whole:
                    os.write(self.fd, EDITOR_READ % len(self.read))
            elif self.late and self.late not in data:
                os.write(self.fd, (b"" if whole else b"\n") + self.late)
                note("%s: the editor saved over %d byte%s appended while it was open; "
                     "appended again" % (self.path, len(self.late), plural(len(self.late))))
        except OSError:
            pass  # (no queue file now, or no room: runners fall back on read_by_save's rules)
        finally:
            os.close(self.fd)


def wait_edit(fd, edited):
    """Until the editor has exited (its sh writes to or closes fd), watching
    the file it edits."""
    while True:
        try:
            if select.select([fd], [], [], EDIT_WATCH)[0]:
                os.read(fd, 1)
                return
            if edited is not None:
                edited.watch()
        except KeyboardInterrupt:
            continue  # Ctrl-C is for the editor (it shares the terminal)
        except OSError:
            if edited is None:
                raise
            edited = None  # (the file cannot be read: no more watching)


def wait_editor(editor):
    while True:
        try:
            return editor.wait()
        except KeyboardInterrupt:
            continue  # Ctrl-C is for the editor (it shares the terminal)


def wait_for_lock(queue_path, mode):
    lock = QueueLock(queue_path, mode)
    told = False
    with stoppable():
        while not lock.try_acquire():
            if not told:
                note("waiting for %s, held by %s" % (lock.path, lock.holder()))
                told = True
            time.sleep(LOCK_RETRY)
    return lock


def mode_add(options):
    """Append jobs to the queue file under the lock; a running pegasus takes them."""
    commands = list(options.commands)
    if commands == ["-"]:
        commands = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not commands:
        raise PegasusError("add: give the jobs as arguments, or - to read them from "
                           "stdin, one command per line")
    for command in commands:
        if not command.strip():
            raise PegasusError("add: refusing an empty command")
    text = "".join(dump_entry(command) for command in commands)
    if not os.path.exists(options.queue_file):
        append_after_newline(options.queue_file, b"")
    queue = QueueFile(options.queue_file, "add")
    lock = wait_for_lock(options.queue_file, "add")
    try:
        queue.append(text)
    except OSError as e:
        raise PegasusError("%s: cannot add the job%s: %s" % (
            options.queue_file, plural(len(commands)), e.strerror)) from None
    finally:
        lock.release()
    note("added %d job%s to %s" % (len(commands), plural(len(commands)), options.queue_file))
    return EXIT_OK


def mode_status(options):
    """Print what every pegasus running on the queue does, from their state files."""
    live, dead = runners_of(options)
    for number, runner in enumerate(live):
        if number:
            print()
        state = runner.state_file().read()
        if state is None:
            print("%s: starting" % runner.who())
        else:
            print_state(state, runner.node)
    for runner in dead:
        try:
            count = len(replay(runner.path, runner.lines)[0])
            left = "%d job%s" % (count, plural(count))
        except PegasusError:
            left = "the jobs"
        note("%s crashed; the next run on %s puts back %s it left unfinished"
             % (runner.who(), options.queue_file, left))
    return EXIT_OK


STOPPING = {DRAIN: ", stopping (no new jobs)", CANCEL: ", cancelling its jobs",
            HURRY: ", killing its jobs"}


def print_state(state, node):
    now = time.time()
    print("pegasus pid %s on %s, %s mode on %s, running for %s: %d done, %d failed, "
          "%d running, %d queued%s" % (state["pid"], node, state["mode"], state["queue"],
                                       duration(now - state["started"]), state["done"],
                                       state["failed"], state["running"], state["queued"],
                                       STOPPING.get((state.get("stop") or {}).get("level"),
                                                    "")))
    if state.get("queue_wait") or state.get("queue_problem"):
        print(state.get("queue_wait") or "%s; the queued count is from before it"
              % state["queue_problem"])
    rows = [("SLOT", "HOST", "FOR", "JOB")]
    for slot in state["slots"]:
        name = slot["slot"]
        for job in slot["jobs"]:
            numbers = "" if slot["capacity"] == 1 else " #" + ",".join(map(str, job["slots"]))
            since = duration(now - job["since"]) if job.get("began", True) else "waiting"
            rows.append((name + numbers, slot["connection"], since, shown(job["job"])))
        if slot["free"]:
            idle = "idle" if slot["capacity"] == 1 else "%d of %d slots free" % (
                len(slot["free"]), slot["capacity"])
            room = slot.get("room")  # None: its host takes as many sessions as asked
            if room is not None and room < len(slot["free"]):
                idle += "; its host allows %s more session%s now" % (room or "no", plural(room))
            rows.append((name, slot["connection"], "", "(%s)" % idle))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])


def mode_stop(options):
    """Ask every pegasus running on the queue (--pid: one) to stop: after
    its running jobs, or (--now) at once. A signal cannot reach another
    machine: a runner on another login node is named, not stopped."""
    live, _ = runners_of(options)
    here, code = os.uname().nodename, EXIT_OK
    for runner in live:
        if runner.node != here:
            note("%s: cannot signal it from %s; run pegasus.py stop on %s"
                 % (runner.who(), here, runner.node))
            code = EXIT_FAILED
            continue
        # SIGUSR1 and SIGUSR2, not SIGINT and SIGTERM: the runner can tell a
        # request from an interrupt, and exits 0 when asked to stop and all is well.
        before = (runner.state_file().read() or {}).get("running", 0)
        try:
            os.kill(int(runner.pid), signal.SIGUSR2 if options.now else signal.SIGUSR1)
        except ProcessLookupError:
            continue  # it ended just now
        running, starting = stopped_running(runner, CANCEL if options.now else DRAIN, before)
        jobs = running_jobs(running, starting)
        if options.now:
            note("asked pegasus (pid %s) to cancel its %s and exit" % (runner.pid, jobs))
        else:
            note("asked pegasus (pid %s) to start no new job and exit when its %s %s"
                 % (runner.pid, jobs, "finishes" if running + starting == 1 else "finish"))
    return code


def stopped_running(runner, level, before):
    """(running, starting): the runner's jobs when it took the stop (it saves
    its state file then). If it has ended first (or says nothing within
    STOP_WAIT), `before`, its state file's count before the signal."""
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline:
        state = runner.state_file().read()
        if state is None:
            return before, 0  # (gone: nothing ran long enough to see)
        taken = state.get("stop") or {}
        if taken.get("level", 0) >= level:
            return taken["running"], taken.get("starting", 0)
        time.sleep(0.005)
    return before, 0



MODES = {"q": mode_queue, "b": mode_broadcast, "l": mode_lock, "add": mode_add,
         "s": mode_status, "stop": mode_stop}

# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

EPILOG = """\
modes, with an example each:
  q     pegasus.py q           run every job in queue.yaml once, on the next free host
  b     pegasus.py b -i        run every job on every host, step by step, despite failures
  l     pegasus.py l           lock queue.yaml and edit it while a run goes on
  add   pegasus.py add 'echo a' 'echo b'
                               append jobs to queue.yaml (- reads them from stdin)
  s     pegasus.py s           show what a running pegasus is doing, slot by slot
  stop  pegasus.py stop --now  make a running pegasus cancel its jobs and exit

one-liners (no files):
  pegasus.py b -H 'node-[1-8]' 'nvidia-smi -L'
                               run a command on every host, prefixed by host
  pegasus.py q -H gpu1,gpu2 'cmd one' 'cmd two' 'cmd three'
                               run commands on the next free host
  cat jobs.txt | pegasus.py q -H 'gpu[1-4]' -
                               the commands on stdin, one a line
  pegasus.py q --slurm - < jobs.txt
                               on the nodes of this Slurm allocation

more examples:
  pegasus.py q --dry-run       show the slots and the commands that would run
  pegasus.py q -d --joblog jobs.tsv
                               keep waiting for jobs; log each finished one

exit status: 0 every job succeeded (also after `pegasus.py stop`), 1 some job
failed, 2 bad usage or files or no host reachable, 130 interrupted (Ctrl-C,
SIGTERM, SIGHUP, stop --now), 141 the reader of the output went away."""


class VersionAction(argparse.Action):
    """--version: the version and a hash of this file, computed only when
    asked (copies travel, and lose where they came from)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        import hashlib
        try:
            # As given, not made absolute: abspath would drop a `dir/..`
            # after a symlinked dir by its text, and name another file.
            with open(__file__, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()[:12]
        except OSError:
            digest = "unknown"
        print("pegasus.py %s (file %s)" % (__version__, digest))
        parser.exit()


def build_parser():
    parser = argparse.ArgumentParser(
        prog="pegasus.py", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a queue of shell jobs on many hosts over ssh.")
    parser.add_argument("mode", choices=list(MODES), metavar="MODE",
                        help="q (queue), b (broadcast), l (lock and edit the queue), "
                             "add (append jobs to the queue file), s (status of a running pegasus), "
                             "stop (stop it)")
    parser.add_argument("commands", nargs="*", metavar="COMMAND",
                        help="(q, b) commands to run instead of the queue file's, writing "
                             "no file; (add) commands to append to the queue file. \"-\" "
                             "reads them from stdin, one a line")
    parser.add_argument("-H", "--host", action="append", metavar="HOSTS",
                        help="hosts to run on instead of hosts.yaml: commas and ranges, "
                             "e.g. -H node-[1-8] or -H gpu1,gpu[3-4,7] (repeatable)")
    parser.add_argument("--slurm", action="store_true",
                        help="run on the nodes of this Slurm allocation "
                             "($SLURM_JOB_NODELIST) instead of hosts.yaml")
    parser.add_argument("-d", "--daemon", action="store_true",
                        help="when the queue is empty, wait for more jobs instead of exiting")
    parser.add_argument("-i", "--ignore-errors", action="store_true",
                        help="(broadcast) go on to the next job even if one failed")
    parser.add_argument("-e", "--error-aborts", action="store_true",
                        help="(queue) stop at the first job that fails: start no new job "
                             "and let the running ones finish (broadcast mode always stops, "
                             "unless -i)")
    parser.add_argument("--timeout", type=duration_arg, metavar="DURATION",
                        help="end a job that runs longer (as a cancel would), and count it "
                             "failed: 90, 90s, 15m, 2h, 1h30m")
    parser.add_argument("--plain", action="store_true",
                        help="print only what the jobs print: no prefixes, no run and done lines")
    parser.add_argument("--group", action="store_true",
                        help="print each job's output together, when it ends, not line by "
                             "line as it comes")
    parser.add_argument("--editor", help="(lock) the editor to open (default: $EDITOR, vim)")
    parser.add_argument("--retries", type=non_negative, default=0, metavar="N",
                        help="run a job that failed again, up to N more times "
                             "(queue mode: on another slot when there is one)")
    parser.add_argument("--strict-fifo", action="store_true",
                        help="(queue) when the head job does not fit, start nothing behind "
                             "it (default: smaller jobs may backfill other hosts)")
    parser.add_argument("-p", "--print-period", type=non_negative, default=1, metavar="N",
                        help="print every Nth line of job output; 0 prints none (default 1)")
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="show the slots and the commands that would run; "
                             "connect to nothing, change no file")
    parser.add_argument("--joblog", metavar="FILE",
                        help="append a tab-separated line per finished job to FILE")
    parser.add_argument("--output-dir", metavar="DIR",
                        help="also keep each job's output in a file of its own in DIR")
    parser.add_argument("--now", action="store_true",
                        help="(stop) cancel the running jobs instead of waiting for them")
    parser.add_argument("--pid", type=int, metavar="PID",
                        help="(s, stop) only the pegasus with this pid, when several run "
                             "on one queue")
    parser.add_argument("--queue-file", metavar="FILE",
                        help="the job queue (default queue.yaml)")
    parser.add_argument("--hosts-file", metavar="FILE",
                        help="the hosts (default hosts.yaml; without it, this machine)")
    parser.add_argument("-F", "--ssh-config", metavar="FILE",
                        help="an ssh config file to use instead of ~/.ssh/config")
    parser.add_argument("--ssh-option", action="append", default=[], metavar="OPTION",
                        help="an ssh -o option, e.g. --ssh-option Port=2222 (repeatable)")
    parser.add_argument("--session-per-job", action="store_true",
                        help="one ssh session per job, as Pegasus does, instead of a "
                        "long-lived agent per slot (bash) on each host")
    parser.add_argument("--ssh", default="ssh", help=argparse.SUPPRESS)
    parser.add_argument("-V", "--version", action=VersionAction)
    return parser


def duration_arg(text):
    """Seconds from "90", "90s", "15m", "2h" or "1h30m"."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s?)?", text.strip())
    if not text.strip() or match is None:
        raise argparse.ArgumentTypeError("%r is not a duration (90, 90s, 15m, 2h, 1h30m)" % text)
    hours, minutes, seconds = match.groups()
    value = int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)
    if value <= 0:
        raise argparse.ArgumentTypeError("%r: a timeout must be more than 0" % text)
    return value


def non_negative(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError("%r is not a whole number of 0 or more" % text)
    return value


def check_options(parser, options):
    """Refuse combinations that cannot mean anything; exits 2 with usage."""
    sources = [flag for flag, given in (("-H", options.host), ("--slurm", options.slurm),
                                        ("--hosts-file", options.hosts_file)) if given]
    if len(sources) > 1:
        parser.error("%s: give the hosts one way" % " and ".join(sources))
    if options.commands and options.mode != "add":
        if options.mode not in ("q", "b"):
            parser.error("mode %s takes no commands (got %r)" % (options.mode,
                                                                 options.commands[0]))
        if options.queue_file:
            parser.error("commands as arguments and --queue-file: give the jobs one way")
        if options.daemon:
            parser.error("-d waits for jobs added to the queue file; commands given as "
                         "arguments have none")
    options.queue_file = options.queue_file or "queue.yaml"


def open_standard_streams():
    """A stdin, stdout or stderr closed at start (`>&-`) is /dev/null to us:
    else the next file opened takes its number, and what is meant for the
    terminal lands in it (a lock file, a journal), or Python has no stream
    for it (None) and a run fails where it first prints."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, encoding="utf-8", errors="replace"))


def main(argv=None):
    open_standard_streams()
    parser = build_parser()
    try:
        # Intermixed: commands may come after options (q -H a,b 'cmd one' 'cmd two').
        options = parser.parse_intermixed_args(argv)  # (--version prints here)
        check_options(parser, options)
        code = MODES[options.mode](options)
        sys.stdout.flush()  # here, so that a closed pipe is caught below
        return code
    except PegasusError as e:
        print("pegasus: error: %s" % e, file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        drop_stdout()  # `pegasus.py s | head -1`: the reader has all it wants
        return EXIT_PIPE
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            raise
        drop_stdout()  # stdout on a full disk (`s > /dev/full`): said in one line
        print("pegasus: error: cannot write the output: %s" % e.strerror, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        note("stopped")
        return EXIT_INTERRUPTED


def drop_stdout():
    """Point stdout at /dev/null: what is left in its buffer goes nowhere,
    so that the flush at exit cannot fail again."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)


def leave(code):
    """Exit without Python's teardown of the heap and modules: 13 ms at the
    end of every run (W3), of no use once main() has closed its files and
    reaped its children. Only a flush that fails takes the usual way out,
    so that Python reports it as it always does."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    leave(main())
