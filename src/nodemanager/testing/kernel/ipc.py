"""SysV IPC objects as ``/proc/sysvipc/*`` lists them and ``ipcrm`` removes them: what a removed
account can leave behind outside any directory."""

from __future__ import annotations

from dataclasses import dataclass

from .net import OK, Answer, Unmodelled

#: The header of each ``/proc/sysvipc`` file (Linux 6.x), and the option ``ipcrm`` takes.
HEADERS = {
    "shm": "key shmid perms size cpid lpid nattch uid gid cuid cgid atime dtime ctime rss swap",
    "msg": "key msqid perms cbytes qnum lspid lrpid uid gid cuid cgid stime rtime ctime",
    "sem": "key semid perms nsems uid gid cuid cgid otime ctime",
}
OPTIONS = {"-m": "shm", "-q": "msg", "-s": "sem"}


@dataclass(frozen=True)
class IpcObject:
    kind: str
    ident: int
    key: int
    uid: int
    gid: int
    cuid: int
    cgid: int


class SysvIpc:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, int], IpcObject] = {}
        self._next = 0

    def add(self, kind: str, uid: int, gid: int | None = None, *, creator: int | None = None) -> int:
        """A segment, queue or semaphore set made by ``creator`` (default ``uid``), owned by ``uid``."""
        ident = self._next
        self._next += 32768  # ids advance by the slot sequence, as the kernel's do
        gid = uid if gid is None else gid
        cuid = uid if creator is None else creator
        self.objects[(kind, ident)] = IpcObject(kind, ident, 0x5100 + len(self.objects), uid, gid, cuid, gid)
        return ident

    def owned_by(self, uid: int) -> list[IpcObject]:
        return [o for o in self.objects.values() if uid in (o.uid, o.cuid)]

    def text(self, kind: str) -> bytes:
        """``/proc/sysvipc/<kind>``: a header, then one line per object."""
        columns = HEADERS[kind].split()
        lines = [" ".join(f"{c:>10}" for c in columns)]
        for o in sorted((o for o in self.objects.values() if o.kind == kind), key=lambda o: o.ident):
            values = {"key": o.key, columns[1]: o.ident, "perms": 600, "uid": o.uid, "gid": o.gid, "cuid": o.cuid,
                      "cgid": o.cgid}
            lines.append(" ".join(f"{values.get(c, 0):>10}" for c in columns))
        return ("\n".join(lines) + "\n").encode()

    def ipcrm(self, args: list[str]) -> Answer:
        if len(args) != 2 or args[0] not in OPTIONS or not args[1].isdigit():
            raise Unmodelled("ipcrm " + " ".join(args))
        if self.objects.pop((OPTIONS[args[0]], int(args[1])), None) is None:
            return 1, b"", f"ipcrm: invalid id ({args[1]})"
        return OK
