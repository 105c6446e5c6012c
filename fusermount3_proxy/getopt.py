"""glibc's getopt_long, as fusermount3 calls it: same order of effects, same messages.

Callers of fusermount3 depend on its option parsing down to the details:
arguments are permuted (options may follow the mountpoint) unless
POSIXLY_CORRECT is set, long options may be abbreviated, and options are
acted on one at a time, in order, so "-h" exits before a later bad option is
seen. A long option that is not in the table is refused exactly as glibc
refuses it, which is what libfuse >= 3.19 relies on to fall back from
--sync-init. Python's getopt module differs on all of these.
"""

# No imports but the package's getenv, and no "from __future__ import
# annotations" (it imports a module): this is on the path of every mount.
from fusermount3_proxy import getenv

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping


class GetoptError(Exception):
    """A bad command line; str() is glibc's message, to print after "argv[0]: "."""


class GetoptLong:
    """getopt_long(argc, argv, shortopts, longopts) over args (argv without argv[0]).

    shortopts is as for getopt(3) ("o:" takes an argument); longopts maps each
    long name to (its key, whether it takes an argument). Iterating yields
    (key, optarg) for each option in order: the option's letter, or for a
    long option the key its table gives. A bad option raises GetoptError when
    the iteration reaches it. The non-option arguments are in operands once
    the iteration has ended.
    """

    def __init__(
        self, args: list[str], shortopts: str, longopts: "Mapping[str, tuple[str, bool]]"
    ) -> None:
        self.operands: list[str] = []
        self._args = args
        self._shortopts = shortopts
        self._longopts = longopts

    def __iter__(self) -> "Iterator[tuple[str, str | None]]":
        argv = self._args
        posixly_correct = getenv("POSIXLY_CORRECT") is not None
        i = 0
        n = len(argv)
        while i < n:
            arg = argv[i]
            i += 1
            if arg == "--":
                self.operands.extend(argv[i:])
                return
            if len(arg) < 2 or arg[0] != "-":
                if posixly_correct:
                    self.operands.extend(argv[i - 1 :])
                    return
                self.operands.append(arg)
                continue

            if arg.startswith("--"):
                body = arg[2:]
                name, eq, value = body.partition("=")
                if name in self._longopts:
                    full = name
                else:
                    matches = [long for long in self._longopts if long.startswith(name)]
                    if not matches:
                        raise GetoptError(f"unrecognized option '--{body}'")
                    if len(matches) > 1:
                        choices = "".join(f" '--{m}'" for m in matches)
                        raise GetoptError(
                            f"option '--{name}' is ambiguous; possibilities:{choices}"
                        )
                    full = matches[0]
                key, takes_arg = self._longopts[full]
                optarg: str | None = None
                if takes_arg:
                    if eq:
                        optarg = value
                    elif i < n:
                        optarg = argv[i]
                        i += 1
                    else:
                        raise GetoptError(f"option '--{full}' requires an argument")
                elif eq:
                    raise GetoptError(f"option '--{full}' doesn't allow an argument")
                yield key, optarg
                continue

            j = 1
            while j < len(arg):
                ch = arg[j]
                j += 1
                spec = self._shortopts.find(ch)
                if ch == ":" or spec < 0:
                    raise GetoptError(f"invalid option -- '{ch}'")
                optarg = None
                if self._shortopts[spec + 1 : spec + 2] == ":":
                    if j < len(arg):
                        optarg = arg[j:]
                    elif i < n:
                        optarg = argv[i]
                        i += 1
                    else:
                        raise GetoptError(f"option requires an argument -- '{ch}'")
                    j = len(arg)
                yield ch, optarg
