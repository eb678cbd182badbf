#!/usr/bin/env python3
# /// script
# requires-python = ">=3.8"
# dependencies = ["pyyaml", "pybars3"]
# ///
"""pegasus.py: run a bag of shell jobs on the machines you can ssh into.

Write hosts.yaml (where to run) and queue.yaml (what to run), then:

    ./pegasus.py q      queue mode: each job runs once, on the next free slot
    ./pegasus.py b      broadcast mode: each job runs on every slot, in lock-step
    ./pegasus.py l      lock mode: lock queue.yaml and open it in an editor

Hosts and jobs may be parametrized (a mapping of lists expands to the
cartesian product) and are filled in with Handlebars templates. Jobs that
start move from queue.yaml to consumed.yaml; the queue file keeps the user's
comments and layout. With -d/--daemon an empty queue does not end the run.

How it works: one ssh ControlMaster per host (the system `ssh`, so the user's
~/.ssh/config applies), every job a cheap session on it. A single `selectors`
loop reads every job's output, exits, signals and timers. Each job runs under
a small `sh` wrapper that kills the job's process group when its ssh
connection goes away, so jobs never outlive pegasus. An fcntl lock on a
sidecar file (queue.yaml.lock) guards the queue file against lock mode.

Needs Python 3.8+, OpenSSH 7.6+, Linux or macOS, and two packages: PyYAML and
pybars3. This is a re-creation of Pegasus (the Rust crate pegasus-ssh) and
reads the same files.
"""

import argparse
import collections
import datetime
import errno
import fcntl
import heapq
import itertools
import json
import os
import re
import resource
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

yaml = None  # PyYAML, imported by need_yaml(): `--help` and `s` do without it

__version__ = "0.1.0"

# ----------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------

EXIT_OK = 0            # every job succeeded
EXIT_FAILED = 1        # at least one job failed
EXIT_USAGE = 2         # bad command line, bad file, no host reachable
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C or SIGTERM before the queue was done

LOCAL_HOSTNAMES = {"localhost", "127.0.0.1", "::1"}

# sshd's MaxSessions defaults to 10 per connection and the master keeps one
# session for itself, so at most this many jobs share one master; a hostname
# with more slots gets a second master.
SESSIONS_PER_MASTER = 8

# A line longer than this is printed in pieces, so a job that writes
# gigabytes without a newline cannot exhaust memory.
MAX_LINE = 1 << 20

READ_SIZE = 1 << 16
CONNECT_POLL = 0.02    # how often to look for a new master's control socket
QUEUE_POLL = 0.5       # how often to stat the queue file while waiting on it
LOCK_RETRY = 0.2       # how often to retry the queue lock while lock mode holds it
HOST_CHECK_DELAY = 0.5  # after a job's ssh exits 255, when to look whether its master died
RECONNECT_FIRST = 2.0  # seconds before reconnecting a lost host; doubles each failure ...
RECONNECT_MAX = 60.0   # ... up to this
WRITE_RETRY = 5.0      # after a failed write of the queue file, when to try again
STATUS_PERIOD = 0.25   # status line redraws and state file saves, at most this often
PROGRESS_PERIOD = 30.0  # without a terminal, a progress line this often
PUT_BACK_WAIT = 30.0   # at exit, how long to wait for the lock to put cut-short jobs back
MAX_CONNECTING = 64    # ssh handshakes in flight at once
LOOKAHEAD = 1000       # jobs a backfill looks at past the head, at most
MAX_ENTRY_JOBS = 10 ** 9  # combinations in one queue entry; more is surely a mistake
MAX_SLOTS = 100000     # slots in a hosts file, all expanded in memory
MAX_NESTING_HINT = 1000  # above this rough depth, parse with the Python parser (see compose_list)
DRY_RUN_SHOWN = 1000   # jobs a dry run prints; it counts the rest
HISTORY_TAKES = 64     # recent takes kept to undo a stale save of the queue file (rebase)
RETIRED_WATCH = 10.0   # seconds to watch a replaced queue file for late `>>` appends
RETIRED_MAX = 32       # ... and at most this many of them
MIN_FREE_BYTES = 1 << 16  # free disk, beyond the queue file's size, needed to start

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
#   sh -c 'RUN' sh COMMAND                    (locally)
# DECODE turns the \0NNN escapes back into bytes with printf %b. RUN starts a
# watcher in the background on the wrapper's stdin: pegasus never writes
# there, so EOF means pegasus closed it on purpose (cancel) or died, or the
# connection dropped. Then `kill 0` ends the whole process group, which sshd
# made for this session (and pegasus, locally, with start_new_session). The
# command itself then runs in this very shell, with an empty stdin and no
# positional parameters, so $$, `exit` and `kill $$` mean what they mean under
# `sh -c`; when it ends, the EXIT trap kills the watcher, so what the job left
# running in the background is left alone. (A job that replaces the shell with
# `exec`, or sets its own EXIT trap, keeps the watcher until pegasus closes the
# pipe after the job's exit, and so loses such leftovers.) The watcher uses
# only builtins: a fork and no exec, which matters for thousands of short jobs.
# The text holds no backslash, `!`, newline or single quote, so every login
# shell (sh, bash, zsh, fish, tcsh) passes it through single quotes untouched.
DECODE = 'c=$(printf %b "$1"x);c=${c%x};'
RUN = (
    'exec 3<&0 </dev/null;'
    '(while read -r _;do :;done;kill -TERM 0) <&3 >/dev/null 2>&1 &'
    'exec 3<&-;'
    'trap "kill $! 2>/dev/null" EXIT;'
    'set --;'
    'eval "unset c;$c"'
)

# Bytes that may stand as themselves in the encoded command: safe inside
# single quotes in every shell above. All others become \0NNN.
SAFE_BYTES = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _./,:=+@-")

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
        raise PegasusError("needs PyYAML: pip install --user pyyaml pybars3") from None
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

    @property
    def ever_up(self):
        return any(c.ever_up for c in self.connections)

    def connection(self):
        """The least busy master that is up, for the next job."""
        return min((c for c in self.connections if c.state == "up"), key=lambda c: c.sessions)

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
        detail = " ".join(str(e).split())
        raise PegasusError("%s: invalid YAML: %s" % (path, detail)) from None
    except RecursionError:
        raise PegasusError("%s: nested too deeply to be a list of entries" % path) from None
    if root is None:
        return None
    if not isinstance(root, yaml.SequenceNode):
        raise PegasusError("%s:%d: the file must be a YAML list (lines starting with '- '), "
                           "not a %s" % (path, root.start_mark.line + 1, node_kind(root)))
    refuse_aliases(path, root)
    return root


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


def expand_ranges(name):
    """Host ranges as pdsh and clush write them: node-[01-16], gpu[1-4,7],
    rack[1-2]-n[1-3] (leftmost range outermost). A range whose first number
    has a leading zero keeps that width."""
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


def read_hosts(path):
    """The expanded slots of a hosts file, in order."""
    text = read_text(path)
    root = compose_list(path, text)
    if root is None or not root.value:
        raise PegasusError("%s: no hosts in the file" % path)
    slots = []
    for number, node in enumerate(root.value, 1):
        here = where(path, node, number)
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


def dump_entry(value, indent=0):
    """One YAML list item (`- ...` lines) for a canonical entry."""
    need_yaml()
    dumper, flow = ENTRY_DUMPER, False
    if isinstance(value, dict) and any(len(values) > 1 for values in value.values()):
        dumper, flow = LIST_DUMPER, None  # None: lists of scalars in flow style
    text = yaml.dump([value], Dumper=dumper, default_flow_style=flow,
                     allow_unicode=True, sort_keys=False, width=1 << 30)
    if indent:
        pad = " " * indent
        text = "".join(pad + line for line in text.splitlines(True))
    return text


def _represent_str(dumper, value):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

# ----------------------------------------------------------------------------
# Templates: Handlebars (pybars3) without HTML escaping, strict about names
# ----------------------------------------------------------------------------

_compiler = None
_templates = {}  # template text -> compiled function; compiled once per text


class UndefinedName(Exception):
    """Raised from inside pybars when a template names something not defined."""


class Names(dict):
    """A template's variables. Handlebars renders an unknown name as empty
    text; for shell commands (`rm -rf /{{dir}}`) that is dangerous, so here
    looking one up is an error."""

    def __missing__(self, name):
        raise UndefinedName(name)


def load_pybars():
    # Imported only when some text holds "{{": its grammar costs ~0.3 s.
    global _compiler
    if _compiler is None:
        try:
            import pybars
            import pybars._compiler
        except ImportError:
            raise PegasusError("templates need pybars3: pip install --user pybars3") from None
        # {{x}} HTML-escapes & " ' ` < > through this module-level function and
        # pybars has no switch to turn that off; a shell command needs the text
        # as written. test_pegasus.py pins this on every one of those characters.
        pybars._compiler.escape = lambda text: text
        _compiler = pybars.Compiler()
    return _compiler


def compile_template(text, what):
    compiled = _templates.get(text)
    if compiled is None:
        check_braces(text, what)
        try:
            compiled = load_pybars().compile(text)
        except Exception as e:  # pybars and its parser raise several unrelated types
            raise PegasusError("%s: template error in %r: %s" % (what, text, e)) from None
        _templates[text] = compiled
    return compiled


def check_braces(text, what):
    # pybars quietly takes "{{a" or an unclosed "{{#if}}" as plain text;
    # Handlebars proper (and so Pegasus) rejects both.
    depth = 0
    for tag in re.finditer(r"\{\{(.?)([^{}]*?)(\}\}|$|\{\{)", text):
        if tag.group(3) != "}}":
            raise PegasusError("%s: template error in %r: '{{' is never closed" % (what, text))
        if tag.group(1) == "#":
            depth += 1
        elif tag.group(1) == "/":
            depth -= 1
        if depth < 0:
            break
    if depth:
        raise PegasusError("%s: template error in %r: a {{#block}} is not matched by "
                           "its {{/block}}" % (what, text))


def render(text, names, what):
    """Fill in a template; `what` names the job and host for error messages."""
    if "{{" not in text:
        return text
    template = compile_template(text, what)
    try:
        return str(template(Names(names), helpers=HELPERS))
    except UndefinedName as e:
        raise PegasusError("%s: {{%s}} is not defined (defined here: %s)"
                           % (what, e.args[0], ", ".join(sorted(names)) or "nothing")) from None
    except HelperError as e:
        raise PegasusError("%s: %s" % (what, e)) from None
    except Exception as e:  # pybars' own errors, e.g. an unknown helper in a subexpression
        if type(e).__name__ != "PybarsError":
            raise
        raise PegasusError("%s: template error in %r: %s" % (what, text, e)) from None


class HelperError(Exception):
    pass


def _words(text):
    return re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+", str(text))


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _compare(op):
    def compare(a, b):
        x, y = _number(a), _number(b)
        if x is None or y is None:  # compare as numbers when both are numbers
            x, y = str(a), str(b)
        return op(x, y)
    return compare


def _helper(name, function, arity):
    """Wrap `function` as a pybars helper that checks how many arguments it got."""
    def helper(this, *args):
        if arity is not None and len(args) != arity:
            raise HelperError("helper '%s' takes %d argument%s, got %d"
                              % (name, arity, "" if arity == 1 else "s", len(args)))
        return function(*args)
    return helper


_STRING_HELPERS = {
    # handlebars_misc_helpers' string group, which Pegasus registers.
    "replace": (lambda s, old, new: str(s).replace(str(old), str(new)), 3),
    "to_lower_case": (lambda s: str(s).lower(), 1),
    "to_upper_case": (lambda s: str(s).upper(), 1),
    "to_snake_case": (lambda s: "_".join(w.lower() for w in _words(s)), 1),
    "to_screaming_snake_case": (lambda s: "_".join(w.upper() for w in _words(s)), 1),
    "to_kebab_case": (lambda s: "-".join(w.lower() for w in _words(s)), 1),
    "to_train_case": (lambda s: "-".join(w.capitalize() for w in _words(s)), 1),
    "to_title_case": (lambda s: " ".join(w.capitalize() for w in _words(s)), 1),
    "to_sentence_case": (lambda s: " ".join(_words(s)).capitalize(), 1),
    "to_camel_case": (lambda s: "".join(w.capitalize() if i else w.lower()
                                        for i, w in enumerate(_words(s))), 1),
    "to_pascal_case": (lambda s: "".join(w.capitalize() for w in _words(s)), 1),
    "trim": (lambda s: str(s).strip(), 1),
    "trim_start": (lambda s: str(s).lstrip(), 1),
    "trim_end": (lambda s: str(s).rstrip(), 1),
    "first_non_empty": (lambda *values: next((str(v) for v in values if str(v)), ""), None),
    "len": (lambda s: len(str(s)), 1),
    # Handlebars' comparison helpers; usable as {{#if (eq a "x")}}.
    "eq": (lambda a, b: str(a) == str(b), 2),
    "ne": (lambda a, b: str(a) != str(b), 2),
    "gt": (_compare(lambda a, b: a > b), 2),
    "gte": (_compare(lambda a, b: a >= b), 2),
    "lt": (_compare(lambda a, b: a < b), 2),
    "lte": (_compare(lambda a, b: a <= b), 2),
    "and": (lambda *values: all(values), None),
    "or": (lambda *values: any(values), None),
    "not": (lambda value: not value, 1),
}
HELPERS = {name: _helper(name, f, n) for name, (f, n) in _STRING_HELPERS.items()}


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
    return render(job.command, job_names(job, slot, indices),
                  "job %r on %s" % (job.command, slot.label))


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
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, text.encode(), 0)
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
    """An open temporary file in `directory` with `mode` (not the umask's)."""
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".%s." % name)
    os.fchmod(fd, mode)
    return fd, temp


def write_fd(fd, data):
    os.ftruncate(fd, 0)
    view = memoryview(data)
    offset = 0
    while offset < len(view):
        offset += os.pwrite(fd, view[offset:], offset)
    os.fsync(fd)


def append_durably(path, text, mode=0o644):
    """Append and fsync; returns the size before, to truncate back to. A new
    file gets `mode`: that of the queue file, whose commands it copies."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        before = os.fstat(fd).st_size
        if before == 0:
            os.fchmod(fd, mode)
        data = text.encode("utf-8")
        try:
            while data:
                data = data[os.write(fd, data):]
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
    - A save that replaces the file (sed -i, editors) or rewrites it in place
      may start from a version read before pegasus took some jobs. Each take
      is kept as text edits (self.history); such a save is rebased: the
      version it most likely started from is found (the fewest lines apart),
      and the takes made since are applied to it again.

    on_commit(jobs, temp_path), when set, is called by commit() once the jobs
    are appended to consumed.yaml (fsynced) and temp_path holds the new queue
    text (fsynced), just before temp_path is renamed over the queue file: the
    take is complete when temp_path no longer exists. If it raises, nothing
    is renamed and the jobs are cut from consumed.yaml again. (temp_path may
    be rewritten before the rename, to keep edits made meanwhile.)
    """

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
        self.retired = []      # [fd, bytes accounted for, since]: files we renamed over
        self.history = []      # per recent take, its edits [(old text, new text)]
        self.edits = []        # the edits of the take in progress

    def load(self):
        """Parse the file if it changed; raises PegasusError if it is broken.
        Hold the lock: a stale save is rebased (see the class docstring)."""
        self.carry_over()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise PegasusError("%s: no such file" % self.path) from None
        if not self.stale and same_file(self.source, self.source_signature, st):
            return
        fd, raw = read_source(self.path)
        try:
            foreign = not self.continues(fd, raw)
            text = decode_text(self.path, raw)
            rebased = self.rebase(text, self.committed) if foreign else text
            entries, editable = parse_queue(self.path, rebased)
        except BaseException:
            self.forget_broken()  # keep this one open instead: see changed_on_disk()
            st = os.fstat(fd)
            self.looked_at = (fd, (st.st_ino, len(raw), st.st_mtime_ns))
            raise
        self.forget_broken()
        self.adopt(fd, raw)
        self.stale = False
        self.text, self.entries, self.editable, self.shift = rebased, entries, editable, 0
        self.count = count_jobs(entries)
        self.committed, self.dirty = rebased, rebased != text

    def changed_on_disk(self):
        """True if the file is not what load() last looked at (parsed or
        not), or a late append to a replaced one waits to be carried over:
        someone wrote it since. Cheap: a few stats."""
        if any(os.fstat(fd).st_size > size for fd, size, _ in self.retired):
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

    def take(self, choose):
        """Walk the queue from the head and take the jobs `choose` accepts.

        choose(job) returns what to start the job with (having rendered it
        for its slot), or None to leave the job and look at the next
        (backfill), or raises StopScan to look no further; a PegasusError
        leaves that job and the rest of its entry in the file, and the walk
        goes on. Looks at LOOKAHEAD jobs at most, expanding entries lazily.
        Must hold the lock. Returns [(choice, job)] and a list of
        QueueProblem, one per entry that could not be taken from.
        """
        taken, problems, seen, index, stop = [], [], 0, 0, False
        self.edits = []
        while index < len(self.entries) and seen < LOOKAHEAD and not stop:
            entry = self.entries[index]
            picked, looked, stop = self.walk(entry, choose, LOOKAHEAD - seen, taken, problems)
            seen += looked
            if picked:
                left = remainder(entry.spec, picked)
                self.replace_entry(index, left)
                index += len(left)
            else:
                index += 1
        if taken or self.dirty:
            self.commit([job for _, job in taken])
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

    def replace_entry(self, index, specs):
        """Cut an entry's text out; put `specs` (its leftovers) in its place."""
        entry = self.entries.pop(index)
        if not self.editable:
            self.entries[index:index] = [Entry(0, 0, spec, entry.line) for spec in specs]
            return
        start, end = entry.start + self.shift, entry.end + self.shift
        indent = len(self.text[start:end]) - len(self.text[start:end].lstrip(" "))
        self.insert(start, end, specs, indent, entry.line, index)

    def insert(self, start, end, specs, indent, line, index=0):
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
        self.edits.append((self.text[start:end], replacement))
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

    def put_back(self, jobs):
        """Return jobs to the head of the queue (must hold the lock)."""
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
        self.write()

    def commit(self, jobs):
        """Record `jobs` as taken in consumed.yaml and write the queue file."""
        self.write(jobs)

    def write(self, jobs=()):
        """Write self.text over the queue file, and append `jobs` to
        consumed.yaml first. On failure nothing has changed, on disk or here."""
        self.history.append(self.edits)
        self.edits = []
        try:
            self.write_text(jobs)
        except BaseException as e:
            self.history.pop()
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
        del self.history[:-HISTORY_TAKES]

    def write_text(self, jobs):
        if not self.editable:
            self.text = "".join(dump_entry(spec_canonical(e.spec)) for e in self.entries)
            self.entries, self.editable = parse_queue(self.path, self.text)
            self.shift, self.history[:] = 0, [[]]  # a whole rewrite: no edits to rebase
        target = queue_target(self.path)
        mode = file_mode(target)
        data = self.text.encode("utf-8")
        fd, temp = new_file(os.path.dirname(target), os.path.basename(target), mode)
        try:
            # The new queue text first: a full disk fails here, before
            # consumed.yaml is touched. consumed.yaml is synced before the
            # rename, so a crash leaves a job in one file or both, never neither.
            write_fd(fd, data)
            mark = self.append_consumed(jobs, mode)
            try:
                if self.on_commit is not None and jobs:
                    self.on_commit(jobs, temp)
                data = self.merge(fd, data, target)
                signature = fd_signature(fd)
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
        self.retire()
        self.source, self.source_signature, self.raw = fd, signature, data
        self.committed, self.dirty = self.text, False
        self.carry_over()

    def append_consumed(self, jobs, mode):
        if not jobs:
            return None
        try:
            return append_durably(self.consumed_path,
                                  "".join(dump_entry(j.canonical()) for j in jobs), mode)
        except OSError as e:
            e.pegasus_path = self.consumed_path
            raise

    def merge(self, fd, data, target):
        """Just before the rename: keep what others wrote to the queue file
        since we read it (appended bytes as they are; a save, rebased)."""
        for _ in range(10):
            if not self.changed(target):
                return data
            new_fd, raw = read_source(self.path)
            try:
                if self.continues(new_fd, raw):
                    text = self.text + decode_text(self.path, raw[len(self.raw):])
                else:
                    text = self.rebase(decode_text(self.path, raw), self.text)
                    parse_queue(self.path, text)  # never write a broken file
            except BaseException:
                os.close(new_fd)
                raise
            self.adopt(new_fd, raw)
            self.text = text
            self.stale = True  # parse the merged text at the next load
            data = text.encode("utf-8")
            write_fd(fd, data)
        raise PegasusError("%s keeps changing; no job taken" % self.path)

    def changed(self, target):
        try:
            path = os.stat(target)
        except FileNotFoundError:
            raise PegasusError("%s: no such file (removed while running)" % self.path) from None
        ours = os.fstat(self.source)
        return ((path.st_dev, path.st_ino) != (ours.st_dev, ours.st_ino)
                or fd_signature(self.source) != self.source_signature)

    def continues(self, fd, raw):
        """True if `raw`, read from fd, is our last version plus appends."""
        if self.source is None or not raw.startswith(self.raw):
            return False
        old, new = os.fstat(self.source), os.fstat(fd)
        return (old.st_dev, old.st_ino) == (new.st_dev, new.st_ino)

    def adopt(self, fd, raw):
        """fd, whose content is raw, is now the file we know."""
        if self.source is not None:
            old, new = os.fstat(self.source), os.fstat(fd)
            if (old.st_dev, old.st_ino) == (new.st_dev, new.st_ino):
                os.close(self.source)
            else:
                self.retire()
        st = os.fstat(fd)
        self.source, self.raw = fd, raw
        self.source_signature = (st.st_ino, len(raw), st.st_mtime_ns)

    def retire(self):
        """Our source file is replaced: watch it for appends that land late."""
        if self.source is not None:
            self.retired.append([self.source, len(self.raw), time.monotonic()])
            self.source = None

    def carry_over(self):
        """Bytes appended to a queue file after it was replaced (`>>` opened
        it before, wrote after): append them to the current queue file."""
        now, keep = time.monotonic(), []
        for item in self.retired:
            fd, accounted, since = item
            size = os.fstat(fd).st_size
            if size > accounted:
                late = os.pread(fd, size - accounted, accounted)
                item[1] = size
                try:
                    append_after_newline(queue_target(self.path), late)
                except OSError as e:
                    note("%s: cannot carry over %d bytes appended to it: %s\n%s"
                         % (self.path, len(late), e.strerror, late.decode("utf-8", "replace")))
            if now - since < RETIRED_WATCH:
                keep.append(item)
            else:
                os.close(fd)
        for fd, _, _ in keep[:-RETIRED_MAX]:
            os.close(fd)
        self.retired = keep[-RETIRED_MAX:]

    def rebase(self, text, current):
        """`text` was saved over the queue file by someone else, where we
        had `current`. Apply to it the takes made since the version it most
        likely started from, so a save that raced with a take does not bring
        taken jobs back."""
        for edits in self.history[self.likely_base(text, current):]:
            for old, new in edits:
                text = apply_edit(text, old, new)
        return text

    def likely_base(self, text, current):
        """The index in self.history of the first take made after the
        version `text` was edited from (len(history): the current one):
        the version with the fewest lines apart from it, the newest if tied.
        Versions are rebuilt backwards from the current text, take by take."""
        delta = collections.Counter(text.splitlines(True))
        delta.subtract(collections.Counter(current.splitlines(True)))
        score = sum(abs(count) for count in delta.values())
        best, best_score = len(self.history), score
        for index in range(len(self.history) - 1, -1, -1):
            for old, new in self.history[index]:
                for line in new.splitlines(True):
                    score += abs(delta[line] + 1) - abs(delta[line])
                    delta[line] += 1
                for line in old.splitlines(True):
                    score += abs(delta[line] - 1) - abs(delta[line])
                    delta[line] -= 1
            if score < best_score:
                best, best_score = index, score
        return best

    def append(self, text):
        """Append entries (add mode; must hold the lock): as `>>` does, so
        a running pegasus keeps them whenever it reads."""
        self.load()
        if not self.editable:  # a flow-style list, which '- ' lines would break:
            entries, _ = parse_queue(self.path, text)  # rewrite it whole
            self.entries += entries
            self.write()
            return
        append_after_newline(queue_target(self.path), text.encode("utf-8"))


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


def append_after_newline(path, data):
    """Append, starting a new line if the file does not end with one."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def apply_edit(text, old, new):
    """One edit of a take, on a text that may have moved things around:
    `old` as a whole entry anywhere ("" is the head); gone, the save wins."""
    if not old:
        head = re.search(r"^[ \t]*-(?:[ \t]|$)", text, re.M)
        position = head.start() if head else len(text)
        if position == len(text) and text and not text.endswith("\n"):
            new = "\n" + new
        return text[:position] + new + text[position:]
    position = text.find(old)
    while position > 0 and text[position - 1] != "\n":
        position = text.find(old, position + 1)
    if position < 0:
        return text
    return text[:position] + new + text[position + len(old):]


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
    """Render each distinct job shape on each distinct slot shape once, so a
    typo in a template stops the run before anything connects; and refuse a
    job that needs more slots than any host has."""
    seen = set()
    largest = max(slot.capacity for slot in slots)
    for entry in queue.entries:
        needs = int(entry.spec.get("slots", ["1"])[0])
        if needs > largest and not broadcast:
            raise PegasusError("%s:%d: this entry's jobs need %d slots, but the largest host "
                               "has %d (give hosts 'slots: N' in the hosts file)"
                               % (queue.path, entry.line, needs, largest))
        if not any("{{" in command for command in entry.spec["command"]):
            continue  # nothing to render, nothing that can fail
        for job in expand_jobs(entry.spec):
            for slot in slots:
                shape = (job.command, tuple(job.params), tuple(slot.params))
                if shape not in seen:
                    seen.add(shape)
                    render_job(job, slot)


# ----------------------------------------------------------------------------
# Hosts and ssh: the argv of every ssh we run, and one master per host
# ----------------------------------------------------------------------------


def encode_command(command):
    """The command as printf %b input: safe bytes as they are, others as \\0NNN."""
    data = command.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if b in SAFE_BYTES else "\\0%03o" % b for b in data)


def wrapped_command(command):
    """The text a login shell on the host gets: it runs `command` with sh."""
    encoded = encode_command(command)
    decode = DECODE if encoded != command else "c=$1;"  # no escapes: save a fork
    return "exec sh -c '%s%s' sh '%s'" % (decode, RUN, encoded)


def local_argv(command):
    # An absolute path: searching PATH costs a failed execve per entry, per job.
    return ["/bin/sh", "-c", "c=$1;" + RUN, "sh", command]


def ssh_base(options):
    argv = [options.ssh]
    if options.ssh_config:
        argv += ["-F", options.ssh_config]
    for option in options.ssh_option:
        argv += ["-o", option]
    return argv + list(SSH_OPTIONS)


def master_argv(options, hostname, socket):
    # The master runs `cat` on the host, reading pegasus's pipe: if pegasus
    # dies, cat sees EOF and the master goes too, instead of idling forever.
    return ssh_base(options) + [
        "-o", "ControlMaster=yes", "-o", "ControlPersist=no", "-S", socket,
        "-T", "--", hostname, "cat >/dev/null"]


def job_argv(options, hostname, socket, command):
    return ssh_base(options) + [
        "-o", "ControlMaster=no", "-S", socket,
        "-T", "--", hostname, wrapped_command(command)]  # "--": a hostname is never an option


class Connection:
    """One ssh master (or, for localhost, none) that some slots run jobs over."""

    def __init__(self, hostname, socket):
        self.hostname = hostname
        self.socket = socket   # ControlPath, or None for a local host
        self.state = "up" if socket is None else "down"  # "connecting" | "up" | "down"
        self.proc = None       # the master ssh process
        self.stderr = b""      # the master's last words, for the error message
        self.ever_up = socket is None
        self.failures = 0      # failed attempts in a row, for the backoff
        self.sessions = 0      # jobs running over it now

    def error(self):
        lines = self.stderr.decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else "ssh exited with status %s" % self.proc.returncode

    def alive(self):
        """The master runs (a master whose connection broke exits: keepalives)."""
        return self.socket is None or (self.proc is not None and self.proc.poll() is None)


def make_connections(slots, control_dir):
    """One master per hostname, or one per SESSIONS_PER_MASTER slots when a
    hostname has more; every slot of that hostname may use each of them."""
    capacity = {}
    for slot in slots:
        capacity[slot.hostname] = capacity.get(slot.hostname, 0) + slot.capacity
    connections, by_host = [], {}
    for slot in slots:
        if slot.hostname not in by_host:
            local = slot.is_local
            count = 1 if local else -(-capacity[slot.hostname] // SESSIONS_PER_MASTER)
            by_host[slot.hostname] = [
                Connection(slot.hostname, None if local else
                           os.path.join(control_dir, str(len(connections) + i)))
                for i in range(count)]
            connections += by_host[slot.hostname]
        slot.connections = by_host[slot.hostname]
    return connections


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
    their handlers run here, between events, never in the middle of one."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.timers = []                # heap of [when, seq, callback]
        self.sequence = itertools.count()
        self.signal_handlers = {}
        self.after_events = []          # called after each round (flush output)
        self.wake_read, self.wake_write = os.pipe()
        for fd in (self.wake_read, self.wake_write):
            os.set_blocking(fd, False)
        self.selector.register(self.wake_read, selectors.EVENT_READ, self._on_wakeup)
        signal.set_wakeup_fd(self.wake_write)

    def on_signal(self, signum, callback):
        signal.signal(signum, lambda *_: None)  # the real work happens in _on_wakeup
        self.signal_handlers[signum] = callback

    def _on_wakeup(self, fd):
        try:
            data = os.read(fd, 512)
        except BlockingIOError:
            return
        for signum in data:
            handler = self.signal_handlers.get(signum)
            if handler:
                handler(signum)

    def add_reader(self, fd, callback):
        self.selector.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd):
        self.selector.unregister(fd)

    def call_later(self, delay, callback):
        timer = [time.monotonic() + delay, next(self.sequence), callback]
        heapq.heappush(self.timers, timer)
        return timer

    def cancel(self, timer):
        timer[2] = None

    def run(self, done):
        while not done():
            timeout = None
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            for key, _ in self.selector.select(timeout):
                key.data(key.fd)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                callback = heapq.heappop(self.timers)[2]
                if callback:
                    callback()
            for callback in self.after_events:
                callback()

    def close(self):
        signal.set_wakeup_fd(-1)
        self.selector.close()
        os.close(self.wake_read)
        os.close(self.wake_write)


class Run:
    """One job on one slot, from spawn to exit; owned by the event loop."""

    def __init__(self, slot, job, command, argv, on_lines, on_exit):
        self.slot = slot
        self.label = slot.label  # the output prefix; names the slot numbers held
        self.indices = []       # the slot numbers it holds
        self.connection = None  # the master it runs over
        self.job = job
        self.command = command  # rendered; what the shell runs
        self.on_lines = on_lines  # called with each read's complete lines
        self.on_exit = on_exit
        self.started = time.monotonic()
        self.cancelled = False
        self.host_lost = False  # it ended because its host went away
        self.attempt = 1        # 2 for the first retry, ...
        self.avoid = set()      # labels of slots this job failed on before
        self.partial = {}       # fd -> bytes of an unfinished line
        self.skip_newline = {}  # fd -> the last chunk ended in "\r"
        # A new session: Ctrl-C in the terminal reaches pegasus only, which
        # decides what the jobs should do.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.open_fds = {self.proc.stdout.fileno(): self.proc.stdout,
                         self.proc.stderr.fileno(): self.proc.stderr}

    def read(self, fd, loop):
        try:
            chunk = os.read(fd, READ_SIZE)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            chunk = b""
        if chunk:
            self.take_lines(fd, chunk)
            return
        rest = self.partial.pop(fd, b"")
        if rest:
            self.on_lines(self, [rest])
        loop.remove_reader(fd)
        self.open_fds.pop(fd).close()

    def take_lines(self, fd, chunk):
        # "\r" ends a line too (progress bars), and "\r\n" is one line end,
        # even when a read splits it.
        if self.skip_newline.pop(fd, False) and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        data = self.partial.pop(fd, b"") + chunk
        if b"\r" in data:
            if data.endswith(b"\r"):
                self.skip_newline[fd] = True
            lines = re.split(b"\r\n|\r|\n", data)
        else:
            lines = data.split(b"\n")
        rest = lines.pop()
        while len(rest) > MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        if rest:
            self.partial[fd] = rest
        if lines:
            self.on_lines(self, lines)

    def finished(self):
        return not self.open_fds and self.proc.poll() is not None

    def cancel(self):
        """Stop the job: closing its stdin wakes the wrapper's watcher, which
        kills the job's process group wherever it runs."""
        self.cancelled = True
        if not self.proc.stdin.closed:
            self.proc.stdin.close()

    def status(self):
        code = self.proc.returncode
        if code is not None and code < 0:
            try:
                return "signal %s" % signal.Signals(-code).name
            except ValueError:
                return "signal %d" % -code
        return "exit status %s" % code


# ----------------------------------------------------------------------------
# Output: whole lines prefixed with their slot, the status line, notes on
# stderr, and the records a run leaves (--joblog, --output-dir, failed.yaml)
# ----------------------------------------------------------------------------

# 256-colour codes that stay readable on dark and light backgrounds.
PALETTE = (39, 208, 70, 170, 178, 33, 203, 36, 141, 166, 75, 132)

_status = None  # the StatusLine on screen, if any; note() clears it first


class Printer:
    """Writes job output line by line; one write per round of the loop.

    On a terminal, prefixes are coloured per slot (unless NO_COLOR is set)
    and long lines are wrapped to the window's width with the prefix repeated.
    """

    def __init__(self, print_period, stream=None):
        self.print_period = print_period
        self.buffer = []
        self.stream = stream or sys.stdout
        self.out = self.stream.buffer
        self.broken = False  # stdout closed (pegasus | head): stop printing
        self.counts = {}     # run -> lines seen, for --print-period
        self.tty = self.stream.isatty()
        self.color = self.tty and not os.environ.get("NO_COLOR")
        self.width = None
        self.prefixes = {}   # slot -> prefix bytes
        self.resize()

    def resize(self, *_):
        self.width = terminal_width(self.stream) if self.tty else None

    def prefix(self, run):
        cached = self.prefixes.get(run.label)
        if cached is None:
            label = run.label
            if self.color:
                label = "\x1b[38;5;%dm%s\x1b[0m" % (PALETTE[run.slot.index % len(PALETTE)], label)
            cached = self.prefixes[run.label] = label.encode("utf-8", "replace") + b" "
        return cached

    def lines(self, run, lines):
        """Print a read's complete lines. The common case (every line, not a
        terminal, valid UTF-8) is one join in C for the whole read: W3's
        output volume is bound by this."""
        if self.print_period == 0:
            return
        if self.print_period > 1:
            seen = self.counts.get(run, 0)
            self.counts[run] = seen + len(lines)
            lines = [line for number, line in enumerate(lines, seen + 1)
                     if number % self.print_period == 0]
            if not lines:
                return
        try:
            b"\n".join(lines).decode("utf-8")
        except UnicodeDecodeError:
            lines = [line.decode("utf-8", "replace").encode("utf-8") for line in lines]
        if self.width is None:
            prefix = self.prefix(run)
            self.buffer.append(prefix + (b"\n" + prefix).join(lines) + b"\n")
        else:
            for line in lines:
                self.add(run, line)

    def add(self, run, data):
        prefix = self.prefix(run)
        room = (self.width or 0) - len(run.label) - 1
        if room < 20 or len(data) <= room:
            self.buffer.append(prefix + data + b"\n")
            return
        text = data.decode("utf-8", "replace")
        for start in range(0, len(text), room):
            self.buffer.append(prefix + text[start:start + room].encode("utf-8") + b"\n")

    def started(self, run):
        self.add(run, ("=== run %s ===" % shown(run.command)).encode("utf-8", "replace"))

    def ended(self, run):
        self.counts.pop(run, None)
        elapsed = time.monotonic() - run.started
        self.add(run, ("=== done (%s, %s) ===" % (run.status(), duration(elapsed))
                       ).encode("utf-8", "replace"))

    def flush(self):
        if not self.buffer:
            return
        data, self.buffer = b"".join(self.buffer), []
        if self.broken:
            return
        if _status is not None:
            _status.clear()
        try:
            write_all(self.out, data)
        except OSError:  # EPIPE (pegasus | head), EIO (the terminal closed)
            self.broken = True


def write_all(stream, data):
    """Write all of `data`. Under PYTHONUNBUFFERED (python -u), sys.stdout.buffer
    is a raw file whose write() may stop short, when a signal (SIGCHLD, say)
    interrupts a write to a full pipe, and returns how much it wrote."""
    view = memoryview(data)
    while view:
        written = stream.write(view)
        view = view[written:]
    stream.flush()


class StatusLine:
    """One line at the bottom of a terminal (stderr), redrawn in place."""

    def __init__(self, stream):
        self.stream = stream
        self.shown = False

    def draw(self, text):
        width = terminal_width(self.stream)
        try:
            self.stream.write("\r\x1b[K" + text[:max(0, width - 1)])
            self.stream.flush()
            self.shown = True
        except OSError:
            pass

    def clear(self):
        if self.shown:
            try:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
            except OSError:
                pass
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
    """A message from pegasus itself, as opposed to job output."""
    if _status is not None:
        _status.clear()
    try:
        print("[pegasus] %s" % message, file=sys.stderr, flush=True)
    except OSError:  # the terminal is gone; the run goes on
        pass


JOBLOG_HEADER = "Seq\tSlot\tHost\tStarttime\tJobRuntime\tExitval\tSignal\tCommand\n"


class Records:
    """What a run leaves behind besides its output: one joblog line per
    finished job (as GNU parallel's --joblog), each job's output in a file of
    its own (--output-dir), and failed jobs in failed.yaml, ready to requeue."""

    def __init__(self, options, queue_path):
        self.sequence = itertools.count(1)
        self.failed_path = os.path.join(os.path.dirname(queue_path), "failed.yaml")
        self.queue_path = queue_path  # failed.yaml gets its permissions
        self.output_dir = options.output_dir
        self.joblog = None
        try:
            if self.output_dir:
                os.makedirs(self.output_dir, exist_ok=True)
            if options.joblog:
                self.joblog = open(options.joblog, "a", encoding="utf-8")
                if self.joblog.tell() == 0:
                    self.joblog.write(JOBLOG_HEADER)
                    self.joblog.flush()
        except OSError as e:
            raise PegasusError("%s: %s" % (e.filename, e.strerror)) from None

    def started(self, run):
        run.sequence = next(self.sequence)
        run.wall_start = time.time()
        run.output = None
        if self.output_dir:
            name = "%06d-%s.log" % (run.sequence, run.slot.hostname.replace("/", "_"))
            run.output = open(os.path.join(self.output_dir, name), "wb")

    def lines(self, run, lines):
        if run.output is not None:
            run.output.write(b"\n".join(lines) + b"\n")

    def ended(self, run):
        if run.output is not None:
            run.output.close()
        if self.joblog is not None:
            code = run.proc.returncode
            fields = (run.sequence, run.label, run.slot.hostname, "%.3f" % run.wall_start,
                      "%.3f" % (time.monotonic() - run.started),
                      code if code >= 0 else -1, -code if code < 0 else 0,
                      run.command.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t"))
            self.joblog.write("\t".join(map(str, fields)) + "\n")
            self.joblog.flush()

    def failed(self, job):
        try:
            append_durably(self.failed_path, dump_entry(job.canonical()),
                           file_mode(queue_target(self.queue_path)))
        except OSError as e:
            note("cannot write %s: %s" % (self.failed_path, e.strerror))

    def close(self):
        if self.joblog is not None:
            self.joblog.close()


class StateFile:
    """queue.yaml.state: what runs where right now, for `pegasus.py s` and
    `pegasus.py stop` in another terminal. Rewritten atomically (no fsync:
    it describes the moment, and a crash makes it stale anyway)."""

    def __init__(self, queue_path):
        self.path = queue_path + ".state"

    def write(self, state):
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, temp = tempfile.mkstemp(dir=directory, prefix=".pegasus-state.")
            with os.fdopen(fd, "w") as f:
                json.dump(state, f, indent=1)
            os.replace(temp, self.path)
        except OSError as e:
            note("cannot write %s: %s" % (self.path, e.strerror))

    def read(self):
        """The state of a live runner; a PegasusError if there is none."""
        try:
            with open(self.path) as f:
                state = json.load(f)
        except FileNotFoundError:
            raise PegasusError("no pegasus is running on this queue (%s does not exist)"
                               % self.path) from None
        except (OSError, ValueError) as e:
            raise PegasusError("%s: unreadable: %s" % (self.path, e)) from None
        if not process_alive(state.get("pid")):
            raise PegasusError("pegasus (pid %s) is no longer running; %s is stale"
                               % (state.get("pid"), self.path))
        return state

    def remove(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def process_alive(pid):
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    cmdline = "/proc/%d/cmdline" % int(pid)
    if os.path.exists(cmdline):  # Linux: make sure the pid was not reused
        with open(cmdline, "rb") as f:
            return b"pegasus" in f.read()
    return True


# ----------------------------------------------------------------------------
# Modes: what queue and broadcast mode share, then each of them, then lock
# ----------------------------------------------------------------------------


class Runner:
    """Connects to the hosts, runs jobs on slots, and reports. Queue and
    broadcast mode differ only in which job goes to which slot, when."""

    reconnect = False  # whether a lost host is connected again in the background

    def __init__(self, options, slots, queue, printer):
        self.options = options
        self.slots = slots
        self.queue = queue
        self.printer = printer
        self.loop = Loop()
        self.loop.after_events += [self.run_schedule, printer.flush]
        self.schedule_pending = False
        self.control_dir = tempfile.mkdtemp(prefix="pegasus-", dir=short_temp_dir())
        self.connections = make_connections(slots, self.control_dir)
        self.runs = set()
        self.exiting = set()      # runs whose pipes closed before their process exited
        self.failures = []        # (slot label, command, status) of every failed job
        self.cut_short = []       # jobs cancelled and returned to the queue
        self.succeeded = 0
        self.stopping = False     # no new jobs (first Ctrl-C)
        self.done = False
        self.exit_code = None     # set when the run must end with this code
        self.wait_timer = None    # the pending look at the queue file, if any
        self.blocked = False      # the queue is locked or broken: take nothing
        self.reported = None      # the last queue problem told to the user
        self.unreturned = []      # jobs to put back once the queue lock is free
        self.problems_told = set()  # keys of jobs that could not be rendered, told once
        self.records = Records(options, queue.path)
        self.state = StateFile(queue.path)
        self.state_dirty = True
        self.started_at = time.monotonic()
        self.run_seconds = 0.0    # summed durations of finished jobs, for the estimate
        self.progress_shown = 0   # tenths of the way reported (stderr not a terminal)

    # -- connections --------------------------------------------------------

    def connect(self, connection):
        """Start a master, or queue it while MAX_CONNECTING others log in:
        a thousand handshakes at once would only exhaust processes and fds."""
        if sum(1 for c in self.connections if c.state == "connecting") >= MAX_CONNECTING:
            connection.state = "queued"
            return
        if os.path.lexists(connection.socket):
            os.unlink(connection.socket)  # left by a master that was killed
        argv = master_argv(self.options, connection.hostname, connection.socket)
        connection.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True)
        connection.state = "connecting"
        connection.stderr = b""
        fd = connection.proc.stderr.fileno()
        self.loop.add_reader(fd, lambda fd, c=connection: self.read_master(c, fd))
        self.loop.call_later(CONNECT_POLL, lambda: self.poll_connection(connection))

    def read_master(self, connection, fd):
        chunk = os.read(fd, READ_SIZE)
        if chunk:
            connection.stderr = (connection.stderr + chunk)[-4096:]
        else:
            self.loop.remove_reader(fd)
            connection.proc.stderr.close()
            self.check_masters()

    def poll_connection(self, connection):
        # A master creates its control socket once it has logged in.
        if connection.state != "connecting":
            return
        if os.path.exists(connection.socket) and connection.alive():
            connection.state = "up"
            note("%s %s" % ("reconnected to" if connection.ever_up else "connected to",
                            connection.hostname))
            connection.ever_up = True
            connection.failures = 0
            self.connect_queued()
            self.schedule()
        else:
            self.check_masters()
            if connection.state == "connecting":
                self.loop.call_later(CONNECT_POLL, lambda: self.poll_connection(connection))

    def check_masters(self):
        for connection in self.connections:
            if connection.state in ("down", "queued") or connection.alive():
                continue
            if connection.state == "connecting" and connection.failures == 0:
                note("cannot connect to %s: %s" % (connection.hostname, connection.error()))
            elif connection.state == "up":
                note("lost the connection to %s: %s" % (connection.hostname, connection.error()))
            connection.state = "down"
            connection.failures += 1
            self.connection_down(connection)

    def connect_queued(self):
        for connection in self.connections:
            if connection.state == "queued":
                self.connect(connection)
                if connection.state == "queued":
                    break

    def settling(self):
        return any(c.state in ("connecting", "queued") for c in self.connections)

    def connection_down(self, connection):
        self.connect_queued()
        if not any(c.ever_up or c.state in ("connecting", "queued") for c in self.connections):
            note("no host can be reached")
            self.exit_code = EXIT_USAGE
            self.stopping = True
        elif self.reconnect and not self.stopping:
            delay = min(RECONNECT_MAX, RECONNECT_FIRST * 2 ** (connection.failures - 1))
            self.loop.call_later(delay, lambda: self.reconnect_later(connection))
        self.schedule()

    def reconnect_later(self, connection):
        if connection.state == "down" and not self.stopping:
            self.connect(connection)

    def usable_slots(self):
        return [s for s in self.slots if s.state == "up"]

    def close_connections(self):
        for connection in self.connections:
            proc = connection.proc
            if proc is None:
                continue
            if proc.poll() is None:
                proc.stdin.close()
                proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if not proc.stdin.closed:
                proc.stdin.close()
        shutil.rmtree(self.control_dir, ignore_errors=True)

    # -- jobs ----------------------------------------------------------------

    def start_run(self, slot, job, command, indices, attempt=1):
        connection = slot.connection()
        if connection.socket is None:
            argv = local_argv(command)
        else:
            argv = job_argv(self.options, connection.hostname, connection.socket, command)
        run = Run(slot, job, command, argv, self.on_lines, self.run_finished)
        run.attempt = attempt
        run.connection = connection
        run.indices = indices
        if slot.capacity != 1:
            run.label = "%s #%s]" % (slot.label[:-1], ",".join(map(str, indices)))
        connection.sessions += 1
        slot.free = [i for i in slot.free if i not in indices]
        slot.runs.add(run)
        self.runs.add(run)
        self.records.started(run)
        self.printer.started(run)
        self.state_dirty = True
        for fd in list(run.open_fds):
            self.loop.add_reader(fd, lambda fd, r=run: self.read_run(r, fd))
        return run

    def on_lines(self, run, lines):
        self.printer.lines(run, lines)
        self.records.lines(run, lines)

    def read_run(self, run, fd):
        run.read(fd, self.loop)
        if not run.open_fds:
            self.check_exit(run)

    def check_exit(self, run):
        if not run.finished():
            self.exiting.add(run)  # SIGCHLD will tell when it exits
            return
        self.exiting.discard(run)
        run.proc.stdin.close()
        if run.proc.returncode == 255 and run.connection.socket and not run.cancelled:
            # 255 is ssh's own failure, or the job's exit status. Wait a moment:
            # if the master goes too, the host was lost, not the job.
            self.loop.call_later(HOST_CHECK_DELAY, lambda: self.end_run(run))
        else:
            self.end_run(run)

    def end_run(self, run):
        if run.proc.returncode == 255:
            self.check_masters()  # notice the lost host before the job is judged
        run.host_lost = run.proc.returncode == 255 and not run.connection.alive()
        self.runs.discard(run)
        run.connection.sessions -= 1
        run.slot.runs.discard(run)
        run.slot.free = sorted(run.slot.free + run.indices)
        self.printer.ended(run)
        self.records.ended(run)
        self.run_seconds += time.monotonic() - run.started
        self.state_dirty = True
        run.on_exit(run)
        self.show_progress()

    def on_child(self, signum):
        for run in list(self.exiting):
            self.check_exit(run)
        self.check_masters()

    def record(self, run):
        """Count a finished run; True if it succeeded."""
        if run.proc.returncode == 0:
            self.succeeded += 1
            return True
        self.failures.append((run.label, run.command, "%s after %s" % (
            run.status(), duration(time.monotonic() - run.started))))
        return False

    # -- the queue -------------------------------------------------------------

    def take(self, choose):
        """Take the jobs `choose` accepts from the queue file (see
        QueueFile.take). While the file is locked or broken, returns [] and
        blocks taking until a retry succeeds."""
        lock = self.queue.lock
        if not lock.try_acquire():
            self.block("waiting for %s, held by %s" % (lock.path, lock.holder()),
                       LOCK_RETRY, until_changed=False)
            return []
        taken, error, problems = [], None, []
        try:
            self.queue.load()
            taken, problems = self.queue.take(choose)
        except QueueWriteError as e:
            self.block("%s; no job taken, trying again" % e, WRITE_RETRY, until_changed=False)
        except PegasusError as e:
            error = e
        finally:
            lock.release()
        for problem in problems:  # told once each; the walk went on past them
            if problem.job.key() not in self.problems_told:
                self.problems_told.add(problem.job.key())
                note(str(problem))
        if problems and not taken and not self.runs:
            error = "nothing else can start"
        if error is not None:
            self.block("%s; waiting for %s to change" % (error, self.queue.path),
                       QUEUE_POLL, until_changed=True)
        elif not self.blocked:
            self.reported = None
        return taken

    def block(self, message, delay, until_changed):
        if message != self.reported:
            note(message)
            self.reported = message
        self.blocked = True
        self.retry_later(delay, until_changed)

    def retry_later(self, delay, until_changed):
        """Call schedule() again after `delay`, or once the queue file changes."""
        if self.wait_timer is not None:
            self.loop.cancel(self.wait_timer)

        def retry():
            self.wait_timer = None
            if until_changed and not self.queue.changed_on_disk():
                self.retry_later(delay, True)
                return
            self.blocked = False
            self.schedule()
        self.wait_timer = self.loop.call_later(delay, retry)

    def watch_queue(self):
        """Notice jobs added to the queue file while slots are free."""
        if self.wait_timer is None:
            self.retry_later(QUEUE_POLL, until_changed=True)

    def put_back(self, jobs):
        """Return jobs to the head of the queue file. A lock-mode editor may
        hold the lock for minutes; then they wait in memory and go back as
        soon as it is free (at the latest, before pegasus exits)."""
        self.unreturned.extend(jobs)
        lock = self.queue.lock
        if not lock.try_acquire():
            return False
        try:
            self.queue.put_back(self.unreturned)
            self.unreturned = []
        except PegasusError as e:
            note("%s; will try again" % e)
        finally:
            lock.release()
        return not self.unreturned

    def return_jobs_before_exit(self):
        deadline = time.monotonic() + PUT_BACK_WAIT
        told = False
        while self.unreturned and time.monotonic() < deadline:
            if self.put_back([]):
                break
            if not told:
                note("waiting for %s, held by %s, to put jobs back"
                     % (self.queue.lock.path, self.queue.lock.holder()))
                told = True
            time.sleep(LOCK_RETRY)
        if self.unreturned:
            note("could not put these back in %s (add them by hand):\n%s" % (
                self.queue.path, "".join(dump_entry(j.canonical()) for j in self.unreturned)))

    # -- running -------------------------------------------------------------

    def interrupt(self, signum):
        running = len(self.runs)
        if signum == signal.SIGINT and not self.stopping:
            self.stopping = True
            note("Ctrl-C: no new jobs; waiting for %d running job%s to finish "
                 "(Ctrl-C again to cancel them)" % (running, plural(running)))
        elif self.runs:
            self.stopping = True
            note("cancelling %d running job%s" % (running, plural(running)))
            for run in self.runs:
                run.cancel()
        self.exit_code = EXIT_INTERRUPTED
        self.schedule()

    # -- what the operator sees ------------------------------------------------

    def counts(self):
        done = self.succeeded + len(self.failures)
        return done, len(self.runs), self.queue.count

    def status_text(self):
        done, running, queued = self.counts()
        slots = self.usable_slots()
        down = len({s.hostname for s in self.slots if s.state == "down"})
        elapsed = time.monotonic() - self.started_at
        text = "%d done, %d failed, %d running, %d queued | %d/%d busy" % (
            self.succeeded, len(self.failures), running, queued,
            sum(len(run.indices) for run in self.runs), sum(s.capacity for s in self.slots))
        if down:
            text += ", %d host%s down" % (down, plural(down))
        text += " | %s" % duration(elapsed)
        if done and (running or queued) and slots:
            left = self.run_seconds / done * (running + queued) / sum(s.capacity for s in slots)
            text += ", ~%s left" % duration(left)
        return text

    def show_progress(self):
        """Without a terminal: a line at every tenth of the way."""
        if _status is not None:
            return
        done, running, queued = self.counts()
        total = done + running + queued
        if total >= 10 and done * 10 // total > self.progress_shown:
            self.progress_shown = done * 10 // total
            note("progress: " + self.status_text())

    def tick(self):
        """Every STATUS_PERIOD: redraw the status line, save the state file."""
        if _status is not None:
            _status.draw("[pegasus] " + self.status_text())
        elif time.monotonic() - self.last_progress >= PROGRESS_PERIOD:
            self.last_progress = time.monotonic()
            note("progress: " + self.status_text())
        if self.state_dirty:
            self.state_dirty = False
            self.state.write(self.state_snapshot())
        self.loop.call_later(STATUS_PERIOD, self.tick)

    def state_snapshot(self):
        now, wall = time.monotonic(), time.time()
        return {
            "pid": os.getpid(), "mode": self.options.mode, "queue": self.queue.path,
            "started": wall - (now - self.started_at),
            "done": self.succeeded, "failed": len(self.failures),
            "running": len(self.runs), "queued": self.queue.count,
            "slots": [{"slot": s.label, "host": s.hostname, "connection": s.state,
                       "capacity": s.capacity, "free": s.free,
                       "jobs": [{"job": run.command, "slots": run.indices,
                                 "since": wall - (now - run.started)}
                                for run in sorted(s.runs, key=lambda r: r.indices)]}
                      for s in self.slots]}

    def run(self):
        global _status
        if sys.stderr.isatty():
            _status = StatusLine(sys.stderr)
        self.last_progress = time.monotonic()
        raise_fd_limit()
        self.loop.on_signal(signal.SIGCHLD, self.on_child)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self.loop.on_signal(signum, self.interrupt)
        self.loop.on_signal(signal.SIGWINCH, self.printer.resize)
        self.tick()
        try:
            for connection in self.connections:
                if connection.socket is not None:
                    self.connect(connection)
            self.fill()
            self.loop.run(lambda: self.done)
        finally:
            for run in list(self.runs):
                run.cancel()
            self.close_connections()
            self.loop.close()
            self.printer.flush()
            if _status is not None:
                _status.clear()
                _status = None
            self.state.remove()
            self.records.close()
            self.return_jobs_before_exit()
        return self.report()

    def finish_if_idle(self):
        if not self.runs:
            self.done = True

    def schedule(self):
        """Ask for fill() once this round of the loop is over, so that jobs
        finishing together are replaced under one lock and one write."""
        self.schedule_pending = True

    def run_schedule(self):
        if self.schedule_pending:
            self.schedule_pending = False
            self.fill()

    def report(self):
        total = self.succeeded + len(self.failures)
        if self.cut_short:
            note("cut short and put back at the head of %s: %s" % (
                self.queue.path, ", ".join(shown(job.command) for job in self.cut_short)))
        for label, command, status in self.failures:
            note("failed: %s %s: %s" % (label, shown(command), status))
        note("%d job%s run in %s: %d succeeded, %d failed" % (
            total, plural(total), duration(time.monotonic() - self.started_at),
            self.succeeded, len(self.failures)))
        if self.exit_code is not None:
            return self.exit_code
        return EXIT_FAILED if self.failures else EXIT_OK


class QueueRunner(Runner):
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

    def __init__(self, *args):
        super().__init__(*args)
        self.retries = []       # [job, attempt, failed slot labels, last run] waiting for a slot
        self.reservation = None  # (job key, slot) kept for a waiting head job
        self.oversized = set()  # keys of jobs no host can hold, already reported
        self.largest = max(slot.capacity for slot in self.slots)

    def fill(self):
        if self.done:
            return
        if self.stopping:
            self.finish_if_idle()
            return
        if self.unreturned:
            self.put_back([])  # jobs of lost hosts that found the queue locked
        free = {slot: list(slot.free) for slot in self.usable_slots() if slot.free}
        self.start_retries(free)
        self.waiting = bool(self.queue.count)  # until a walk of the queue says otherwise
        if any(free.values()) and not self.blocked:
            self.waiting = False  # choose() sets it when it leaves a job that could run
            for (slot, indices, command), job in self.take(self.chooser(free)):
                self.start_run(slot, job, command, indices)
        if self.blocked:
            return  # the retry calls schedule() again
        if (not self.waiting and not self.runs and not self.retries and not self.unreturned
                and not self.options.daemon and not self.settling()):
            self.done = True
        elif any(free.values()):
            self.watch_queue()

    def place(self, job, free, avoid=()):
        """The slot (and slot numbers) where `job` fits most tightly, or None."""
        fits = [slot for slot, numbers in free.items()
                if len(numbers) >= job.slots and slot.label not in avoid]
        if not fits:
            return None
        slot = min(fits, key=lambda slot: (len(free[slot]), slot.index))
        return slot, free[slot][:job.slots]

    def chooser(self, free):
        """choose(job) for QueueFile.take: see the class docstring."""
        reserved = []  # the slot held for the first job that does not fit

        def choose(job):
            open_slots = {s: n for s, n in free.items() if n and s not in reserved}
            if not open_slots:
                self.waiting = True
                raise StopScan
            if job.slots > self.largest:
                self.report_oversized(job)
                return None
            found = self.place(job, open_slots)
            if found is None:
                self.waiting = True
                if self.options.strict_fifo:
                    raise StopScan
                if not reserved:
                    reserved.append(self.reserve(job))
                return None
            slot, indices = found
            command = render_job(job, slot, indices)
            del free[slot][:job.slots]
            if self.reservation and self.reservation[0] == job.key():
                self.reservation = None
            return slot, indices, command
        return choose

    def reserve(self, job):
        """The slot held for a head job that fits nowhere now; sticky, so
        that backfill cannot keep moving it out of reach."""
        if self.reservation and self.reservation[0] == job.key() \
                and self.reservation[1].state == "up":
            return self.reservation[1]
        candidates = [s for s in self.usable_slots() if s.capacity >= job.slots]
        if not candidates:
            return None
        slot = max(candidates, key=lambda s: (len(s.free), -s.index))
        self.reservation = (job.key(), slot)
        return slot

    def report_oversized(self, job):
        if job.key() not in self.oversized:
            self.oversized.add(job.key())
            note("%s: job %s needs %d slots, but the largest host has %d; it stays in "
                 "the queue" % (self.queue.path, shown(job.command), job.slots, self.largest))

    def start_retries(self, free):
        """Start waiting retries, each on a slot it has not failed on when
        there is one."""
        for item in list(self.retries):
            job, attempt, avoid, last = item
            found = self.place(job, free, avoid)
            others_exist = any(s.label not in avoid and s.state != "down"
                               and s.capacity >= job.slots for s in self.slots)
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
            del free[slot][:job.slots]
            self.start_run(slot, job, command, indices, attempt).avoid = avoid

    def run_finished(self, run):
        if run.cancelled and run.proc.returncode != 0:
            self.cut_short.append(run.job)
            self.put_back([run.job])
        elif run.host_lost:
            note("%s lost its host; %s goes back to the head of %s"
                 % (run.label, shown(run.command), self.queue.path))
            self.put_back([run.job])
        elif run.proc.returncode != 0 and run.attempt <= self.options.retries:
            note("%s %s failed (%s); retry %d of %d" % (
                run.label, shown(run.command), run.status(), run.attempt,
                self.options.retries))
            avoid = run.avoid | {run.slot.label}
            self.retries.append([run.job, run.attempt + 1, avoid, run])
        elif not self.record(run):
            self.records.failed(run.job)
        self.schedule()

    def finish_if_idle(self):
        for job, attempt, avoid, last in self.retries:
            self.record(last)  # not retried: stopping
            self.records.failed(job)
        self.retries = []
        super().finish_if_idle()


class BroadcastRunner(Runner):
    """Broadcast mode: each job on every slot; the next starts when all are done."""

    def __init__(self, *args):
        super().__init__(*args)
        self.step_failed = []  # labels of the slots that failed this step
        self.step_job = None   # the job of this step

    def fill(self):
        if self.done or self.runs or self.blocked:
            return
        if self.settling():
            return
        slots = self.usable_slots()
        if self.stopping or not slots:
            self.done = True
            return
        if self.step_failed and self.step_job is not None:
            self.records.failed(self.step_job)  # once, however many hosts it failed on
            self.step_job = None
        if self.step_failed and not self.options.ignore_errors:
            note("stopping: the last job failed on %s (use -i to go on)"
                 % ", ".join(self.step_failed))
            self.done = True
            return
        self.step_failed = []
        taken = self.take(self.chooser(slots))
        if taken:
            commands, job = taken[0]
            self.step_job = job
            for slot, command in zip(slots, commands):
                self.start_run(slot, job, command, list(range(slot.capacity)))
        elif not self.blocked:
            if self.options.daemon:
                self.watch_queue()
            else:
                self.done = True

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

    def report(self):
        # Broadcast is for every host: one that never connected missed every job.
        for slot in self.slots:
            if not slot.ever_up:
                note("not run on %s: unreachable" % slot.label)
                self.failures.append((slot.label, "(every job)", "unreachable"))
        return super().report()

    def run_finished(self, run):
        if run.host_lost:
            note("%s lost its host during %s" % (run.label, shown(run.command)))
        elif (run.proc.returncode != 0 and not run.cancelled
              and run.attempt <= self.options.retries and not self.stopping):
            note("%s %s failed (%s); retry %d of %d" % (
                run.label, shown(run.command), run.status(), run.attempt,
                self.options.retries))
            self.start_run(run.slot, run.job, run.command, run.indices, run.attempt + 1)
            return
        if not self.record(run):
            self.step_failed.append(run.label)
        self.schedule()


def short_temp_dir():
    # Control sockets must fit in 104 bytes (macOS), and ssh adds a 17-byte
    # suffix while it binds one: use $TMPDIR only when it is short enough
    # (macOS's long per-user one is not).
    directory = tempfile.gettempdir()
    return directory if len(directory) <= 60 else "/tmp"


def load_slots(options):
    """The slots from the hosts file, or this machine alone if there is none."""
    path = options.hosts_file
    if path is None:
        path = "hosts.yaml"
        if not os.path.exists(path):
            note("no hosts.yaml here: running jobs on this machine, one at a time "
                 "(write hosts.yaml to use others)")
            return [Slot(0, "localhost", {})]
    return read_hosts(path)


def open_queue(options, slots):
    queue = QueueFile(options.queue_file, options.mode)
    if not os.path.exists(options.queue_file):
        raise PegasusError("%s: no such file (write one job per line as '- command', "
                           "or name another with --queue-file)" % options.queue_file)
    queue.load()
    check_queue(queue, slots, options.mode == "b")
    if options.dry_run:
        return queue
    directory = os.path.dirname(os.path.abspath(options.queue_file))
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PegasusError("%s: cannot write in this directory, so jobs could not be "
                           "moved from %s to consumed.yaml" % (directory, options.queue_file))
    for path in (options.queue_file, queue.consumed_path):
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise PegasusError("%s: not writable" % path)
    check_disk_space(options.queue_file)
    return queue


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
        raise PegasusError("%s: no space left on the device (%d bytes free): pegasus "
                           "rewrites the queue file beside itself; free some space"
                           % (os.path.dirname(target), free))


def mode_run(options, runner_class):
    slots = load_slots(options)
    if not all(slot.is_local for slot in slots):
        found = shutil.which(options.ssh)
        if found is None:
            raise PegasusError("cannot find %r on PATH; pegasus runs jobs through it"
                               % options.ssh)
        options.ssh = found
    queue = open_queue(options, slots)
    if options.dry_run:
        return dry_run(slots, queue, runner_class is BroadcastRunner)
    if not queue.entries and not options.daemon:
        note("%s is empty: nothing to do" % options.queue_file)
        return EXIT_OK
    kind = "queue" if runner_class is QueueRunner else "broadcast"
    note("%s mode: %d job%s queued, %d slot%s on %d host%s" % (
        kind, count_jobs(queue.entries), plural(count_jobs(queue.entries)),
        len(slots), plural(len(slots)),
        len({s.hostname for s in slots}), plural(len({s.hostname for s in slots}))))
    runner = runner_class(options, slots, queue, Printer(options.print_period))
    return runner.run()


def dry_run(slots, queue, broadcast):
    """Show what would run; connect to nothing and change no file."""
    total = count_jobs(queue.entries)
    jobs = itertools.islice((job for entry in queue.entries for job in expand_jobs(entry.spec)),
                            DRY_RUN_SHOWN)
    print("%d slot%s:" % (len(slots), plural(len(slots))))
    for slot in slots:
        print("  " + slot.label)
    print("%d job%s in %s:" % (total, plural(total), queue.path))
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


def mode_queue(options):
    return mode_run(options, QueueRunner)


def mode_broadcast(options):
    return mode_run(options, BroadcastRunner)


def mode_lock(options):
    """Hold the queue lock while the user edits the queue file."""
    argv = editor_argv(options.editor or os.environ.get("EDITOR") or "vim")
    check_disk_space(options.queue_file)
    lock = wait_for_lock(options.queue_file, "l")
    try:
        # A small sh inherits the locked descriptor and waits for the editor:
        # if pegasus dies, the kernel keeps the lock until the editor exits,
        # so a save from its buffer never races with a runner. The editor
        # itself runs without it: what it leaves running in the background
        # (a shell escape, a server) cannot hold the lock after it exits.
        script = '"$@" %d>&-; exit $?' % lock.fd
        editor = subprocess.Popen(["sh", "-c", script, "sh"] + argv + [options.queue_file],
                                  pass_fds=(lock.fd,))
        lock.describe(" (editor %s, pid %d)" % (os.path.basename(argv[0]), editor.pid))
        status = wait_editor(editor)
    finally:
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


def editor_argv(editor):
    """A path that names an executable (spaces and all) is the editor;
    else the string is split as a shell would, so "code --wait" works."""
    if os.path.isfile(editor) and os.access(editor, os.X_OK):
        return [editor]
    argv = shlex.split(editor)
    if not argv or shutil.which(argv[0]) is None:
        raise PegasusError("cannot find the editor %r (set $EDITOR or use --editor)" % editor)
    return argv


def wait_editor(editor):
    while True:
        try:
            return editor.wait()
        except KeyboardInterrupt:
            continue  # Ctrl-C is for the editor (it shares the terminal)


def wait_for_lock(queue_path, mode):
    lock = QueueLock(queue_path, mode)
    told = False
    while not lock.try_acquire():
        if not told:
            note("waiting for %s, held by %s" % (lock.path, lock.holder()))
            told = True
        time.sleep(LOCK_RETRY)
    return lock


def mode_add(options):
    """Append jobs to the queue file under the lock; a running pegasus takes them."""
    commands = list(options.jobs)
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
    finally:
        lock.release()
    note("added %d job%s to %s" % (len(commands), plural(len(commands)), options.queue_file))
    return EXIT_OK


def mode_status(options):
    """Print what a running pegasus is doing, from its state file."""
    state = StateFile(options.queue_file).read()
    now = time.time()
    print("pegasus pid %s, %s mode on %s, running for %s: %d done, %d failed, "
          "%d running, %d queued" % (state["pid"], state["mode"], state["queue"],
                                     duration(now - state["started"]), state["done"],
                                     state["failed"], state["running"], state["queued"]))
    rows = [("SLOT", "HOST", "FOR", "JOB")]
    for slot in state["slots"]:
        name = slot["slot"]
        for job in slot["jobs"]:
            numbers = "" if slot["capacity"] == 1 else " #" + ",".join(map(str, job["slots"]))
            rows.append((name + numbers, slot["connection"], duration(now - job["since"]),
                         shown(job["job"])))
        if slot["free"]:
            idle = "(idle)" if slot["capacity"] == 1 else "(%d of %d slots free)" % (
                len(slot["free"]), slot["capacity"])
            rows.append((name, slot["connection"], "", idle))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    return EXIT_OK


def mode_stop(options):
    """Ask a running pegasus to stop: after its running jobs, or (--now) at once."""
    state = StateFile(options.queue_file).read()
    os.kill(int(state["pid"]), signal.SIGTERM if options.now else signal.SIGINT)
    if options.now:
        note("asked pegasus (pid %s) to cancel its %d running job%s and exit"
             % (state["pid"], state["running"], plural(state["running"])))
    else:
        note("asked pegasus (pid %s) to start no new job and exit when its %d running "
             "job%s finish" % (state["pid"], state["running"], plural(state["running"])))
    return EXIT_OK


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

more examples:
  pegasus.py q --dry-run       show the slots and the commands that would run
  pegasus.py q -d --joblog jobs.tsv
                               keep waiting for jobs; log each finished one

exit status: 0 every job succeeded, 1 some job failed, 2 bad usage or files or
no host reachable, 130 interrupted (Ctrl-C, SIGTERM)."""


class VersionAction(argparse.Action):
    """--version: the version and a hash of this file, computed only when
    asked (copies travel, and lose where they came from)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        import hashlib
        try:
            with open(os.path.abspath(__file__), "rb") as f:
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
                             "add (append jobs), s (status of a running pegasus), "
                             "stop (stop it)")
    parser.add_argument("jobs", nargs="*", metavar="JOB",
                        help="(add) commands to append to the queue, or - to read them "
                             "from stdin, one per line")
    parser.add_argument("-d", "--daemon", action="store_true",
                        help="when the queue is empty, wait for more jobs instead of exiting")
    parser.add_argument("-i", "--ignore-errors", action="store_true",
                        help="(broadcast) go on to the next job even if one failed")
    parser.add_argument("-e", "--error-aborts", action="store_true", help=argparse.SUPPRESS)
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
    parser.add_argument("--queue-file", default="queue.yaml", metavar="FILE",
                        help="the job queue (default queue.yaml)")
    parser.add_argument("--hosts-file", metavar="FILE",
                        help="the hosts (default hosts.yaml; without it, this machine)")
    parser.add_argument("-F", "--ssh-config", metavar="FILE",
                        help="an ssh config file to use instead of ~/.ssh/config")
    parser.add_argument("--ssh-option", action="append", default=[], metavar="OPTION",
                        help="an ssh -o option, e.g. --ssh-option Port=2222 (repeatable)")
    parser.add_argument("--ssh", default="ssh", help=argparse.SUPPRESS)
    parser.add_argument("--version", action=VersionAction)
    return parser


def non_negative(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError("%r is not a whole number of 0 or more" % text)
    return value


def main(argv=None):
    parser = build_parser()
    options = parser.parse_intermixed_args(argv)  # add: jobs after options too
    if options.jobs and options.mode != "add":
        parser.error("unexpected arguments for mode %s: %s" % (options.mode,
                                                                " ".join(options.jobs)))
    try:
        return MODES[options.mode](options)
    except PegasusError as e:
        print("pegasus: error: %s" % e, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
