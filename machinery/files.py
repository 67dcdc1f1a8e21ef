"""
Files and errors: one-line error messages (said once under torchrun where every process meets them
alike: say_once), lines printed where the console may be gone (print_line; BarStream for progress
bars), atomic writes, a full disk said as such, a file's SHA-256 (a shard's, in its manifest), sizes
for people (files in powers of 1000, memory in powers of 1024), the RAM processes may use (a
container's or a job's limit), and is_whole_number and number_problem for the counts a file read back
holds (a checkpoint, a manifest, the log: each may have been edited by hand).

Every script writes whole files through write_atomically (checkpoints, the picture, shards, the
manifest, the HellaSwag cache), so a run killed or a disk filled half way never leaves half a file
(the log is appended a line at a time; a half-written last line is dropped when it is read back).
folder_problem says why a run could not write into a folder, before it starts. Used by all the
modules here and by the scripts.
"""

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import sys
import time


# a period that ends an abbreviation, not a sentence
ABBREVIATIONS = ("e.g", "i.e", "etc", "vs", "cf")


def first_line(error):
    """The first sentence of an exception's message: enough for a one-line error."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    line = text.splitlines()[0]
    for end in re.finditer(r"\. ", line):  # the first ". " that is not "e.g. "
        if not line[:end.start()].lower().endswith(ABBREVIATIONS):
            return line[:end.start()]
    return line


class PrepareError(Exception):
    """Bad input to prepare.py (its source, its out_dir): said in one line. Raised by the modules that read
    its documents (corpus.py, fineweb.py) too."""


class SettingError(ValueError):
    """A bad flag or setting, or a file one names that cannot be used (data, a checkpoint): every process of
    a torchrun run on one machine meets it alike, as they parse one command line and read the same files."""
    every_process = True  # (said once: console.say_error)


SAY_ONCE_WAIT_S = 30  # how long a process other than the first waits for torchrun to stop it (say_once)


def say_once(line):
    """Print an error line that every process of a torchrun run meets alike (a bad flag, a SettingError, a
    diverged loss) once on each machine: the first process (LOCAL_RANK 0, or the only one) prints it.
    Every other one waits to be stopped, as torchrun stops the rest once a process has failed, and prints
    it only if it still runs after SAY_ONCE_WAIT_S. (Ending at once, silent, it could get the first one
    stopped before that one has printed.)"""
    if "RANK" in os.environ and os.environ.get("LOCAL_RANK", "0") != "0":  # (torchrun sets both; as strings)
        time.sleep(SAY_ONCE_WAIT_S)
    print_line(line, sys.stderr)


def print_line(line, stream):
    """print(line) to `stream` (sys.stdout or sys.stderr), flushed. A stream that cannot take it (the reader
    of its pipe gone, as a `| tee` stopped with the run; a closed terminal; a full disk) is pointed at
    os.devnull from then on, and the work goes on: a run still saves its checkpoint (its lines are in its
    log.jsonl). Lost stdout is said once on stderr, with the line it could not print."""
    try:
        print(line, file=stream, flush=True)
    except OSError as e:
        point_at_devnull(stream)
        if stream is not sys.stderr:
            with contextlib.suppress(OSError, ValueError):
                print(f"cannot write to stdout ({e.strerror or e}): its lines are dropped from here on; "
                      f"this one was: {line}", file=sys.stderr, flush=True)


def point_at_devnull(stream):
    """From now on `stream` writes to os.devnull (what its buffer holds goes there too)."""
    with contextlib.suppress(OSError, ValueError):  # (no file descriptor, as under a test's capture: as it was)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)


class BarStream:
    """sys.stderr for a progress bar (tqdm's file=): a write it cannot take (the reader of its pipe gone,
    a full disk) points it at os.devnull, as print_line does, instead of ending the work the bar shows."""

    def __init__(self):
        self.stream = sys.stderr

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError:
            point_at_devnull(self.stream)
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except OSError:
            point_at_devnull(self.stream)

    def __getattr__(self, name):  # (isatty, fileno, encoding: the stream's)
        return getattr(self.stream, name)


DISK_FULL = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))  # no space, too large, quota


class DiskFull(OSError):
    """A write found the disk full (or the file too large for it); what was there before is intact."""


def exception_chain(error):
    """`error`, then the exceptions it was raised from or while handling, as a traceback lists them."""
    while error is not None:
        yield error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def disk_full_error(error):
    """The OSError for a full disk behind `error` (torch's zip writer wraps it in a RuntimeError), or None."""
    return next((e for e in exception_chain(error) if isinstance(e, OSError) and e.errno in DISK_FULL), None)


def write_atomically(path, write, shared=False):
    """write(f) into a temporary file beside `path`, then rename it to `path`: a reader, or a run killed
    half way, sees the old file or the new one, never half of one. A full disk raises DiskFull, with
    the old file intact and no temporary file left. `shared`: processes on several machines may write
    `path` at once (a cache on a network filesystem), so the temporary file is named for this one."""
    mine = f".{socket.gethostname()}.{os.getpid()}" if shared else ""
    tmp = path + mine + ".tmp"  # same folder, so os.replace is a rename on one filesystem
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        full = disk_full_error(e)
        if full is not None:
            raise DiskFull(f"disk full: writing {path} failed ({os.strerror(full.errno)})") from None
        raise


def sha256_of(path):
    """A file's SHA-256, in hex: read 16 MB at a time (a shard is 200 MB), never all of it at once."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def in_units(n_bytes, binary=False):
    """Bytes for people: files in powers of 1000 (340 B, 19.7 MB, 1.5 GB); with binary, memory in powers
    of 1024, as nvidia-smi and free count it (512 B, 474.7 MiB, 139.8 GiB)."""
    step, units = (1024, ("B", "KiB", "MiB", "GiB", "TiB")) if binary else (1000, ("B", "kB", "MB", "GB", "TB"))
    for unit in units[:-1]:
        if n_bytes < step:
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= step
    return f"{n_bytes:,.1f} {units[-1]}"


def in_binary_units(n_bytes):
    return in_units(n_bytes, binary=True)


def ram_bytes():
    """The RAM this machine's processes may use together, in bytes: the machine's, or less where a container or
    a scheduler's job caps it (a cgroup's memory limit); None where unknown. (`ulimit -v` caps each process
    alone, and counts address space, not RAM: memory running out under it is the out-of-memory line.) Here,
    not in memory.py, whose torch the scripts that only need this number (prepare.py, its workers) never import."""
    try:
        machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or not these names
        machine = None
    known = [limit for limit in (machine, cgroup_memory_limit()) if limit]
    return min(known, default=None)


def cgroup_memory_limit(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup"):
    """The lowest memory limit of this process's cgroup (v2: memory.max; v1: memory.limit_in_bytes) and those
    above it, in bytes, or None (no cgroups, no limit: "max", or v1's near-2**63)."""
    try:
        with open(proc_cgroup) as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    limits = []
    for _, controllers, path in (line for line in lines if len(line) == 3):
        if controllers == "":  # v2: one tree
            folder, name = root + path, "memory.max"
        elif "memory" in controllers.split(","):  # v1: the memory controller's tree
            folder, name = os.path.join(root, "memory") + path, "memory.limit_in_bytes"
        else:
            continue
        while folder.startswith(root):  # this cgroup, then each above it (a container sees its own as the root)
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(folder, name)) as f:
                    limits.append(int(f.read()))  # ("max": ValueError, no limit)
            folder = os.path.dirname(folder.rstrip("/"))
    limits = [limit for limit in limits if limit < 1 << 60]  # (v1 says "no limit" with about 2**63)
    return min(limits, default=None)


def is_whole_number(value, least=0):
    """An int (not a bool, which is one in Python) of at least `least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def number_problem(numbers):
    """What is wrong with the first of `numbers`, (part's name, part, key, least, default if missing),
    whose part is not a dict or whose value is not a whole number >= least; None if none is."""
    for name, part, key, least, default in numbers:
        if not isinstance(part, dict):
            return f"{name} is a {type(part).__name__}, not a dict"
        if not is_whole_number(part.get(key, default), least):
            return f"{name} {key} is {part.get(key, default)!r}, not a whole number >= {least}"
    return None


def folder_problem(path):
    """Why a run could not write its files into the folder `path` (made if missing), or None: a file
    there, a link to nowhere (or a loop of links), there or on the way to it, a file where a folder would
    be made, a name longer than the filesystem takes, no permission to write. Checked before a run starts,
    so that no training is lost to it at the first save."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"is {broken_link(path)}"
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, not a folder"
    existing, first_made = nearest_existing(path), first_missing_folder(path)  # (where it would be made, if missing)
    if not os.path.isdir(existing):
        return f"cannot be made: {existing!r} is a file"
    if first_made is not None and os.path.islink(first_made):
        return f"cannot be made: {first_made!r} is {broken_link(first_made)}"
    longest = max(os.path.relpath(os.path.abspath(path), existing).split(os.sep), key=len)
    with contextlib.suppress(OSError, ValueError, AttributeError):  # (no pathconf: Windows)
        if len(os.fsencode(longest)) > os.pathconf(existing, "PC_NAME_MAX"):
            return (f"cannot be made: the name {longest[:20]}... is longer than the "
                    f"{os.pathconf(existing, 'PC_NAME_MAX')} bytes a name may have there")
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be written: no permission to write in {existing!r}"
    return None


def broken_link(path):
    """What a link that leads nowhere is, in words: a loop of links, or a link to a missing file."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a link in a loop of links, which leads nowhere"
    return f"a link to {os.readlink(path)!r}, which does not exist"


def nearest_existing(path):
    """path, or the nearest folder above it that exists."""
    while not os.path.exists(path):
        path = os.path.dirname(os.path.abspath(path))
    return path


def first_missing_folder(path):
    """The outermost folder of `path` that does not exist yet (what os.makedirs would make first; the one
    below nearest_existing's), or None."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def free_bytes(path):
    """The free space where `path` is (or would be made)."""
    return shutil.disk_usage(nearest_existing(path)).free


def lock_folder(path, flag="--out_dir", shared=False):
    """A handle that holds an exclusive lock on the folder `path` until it is closed or the process ends
    (flock on the folder itself: no lock file is left behind), or one line when another process holds
    it: two runs writing one folder would overwrite each other's files. None where there is no flock
    (Windows, a file system without locks). `shared`: a shared lock, which only an exclusive one stops."""
    try:
        import fcntl
    except ImportError:  # (Windows)
        return None
    handle = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise SettingError(f"another run is writing {path!r} now: wait for it to end, or choose another {flag}"
                           ) from None
    except OSError as e:
        os.close(handle)
        # a file system without locks (some NFS; SMB on macOS, whose ENOTSUP is not its EOPNOTSUPP)
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
            return None
        raise
    return handle


def check_folder_free(path, flag="--out_dir"):
    """lock_folder's line at once, before the heavy work (a model built, a checkpoint read), when another run
    holds `path`; the run's own lock is taken later, and held (RunLog). Every process of a torchrun run asks,
    with a shared lock, which another's probe does not stop: all of them meet another run's lock alike, and it
    is said once (rank 0 takes its own lock only after a collective that every probe precedes)."""
    if os.path.isdir(path):
        handle = lock_folder(path, flag, shared=True)
        if handle is not None:
            os.close(handle)
