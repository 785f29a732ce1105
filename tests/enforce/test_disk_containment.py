"""Disk images against a scripted FakeHost: root never copies a home, images are private,
overcommit is reported, and the sweep removes what belongs to no account.

The same promises against the real kernel: ``tests/integration/test_hostile_sliver.py``.
"""

from __future__ import annotations

from pathlib import Path

from nodemanager.enforce.disk import DiskEnforcer

HOMES = Path("/home")
IMAGES = Path("/var/lib/nm/images")


def image_disk(host) -> DiskEnforcer:  # type: ignore[no-untyped-def]
    return DiskEnforcer(host, HOMES, IMAGES, mechanism="image")


def test_images_are_private_from_their_first_byte(host) -> None:  # type: ignore[no-untyped-def]
    image_disk(host).prepare_home("a", 1001, 1001, HOMES / "a", 20480)
    made = next(i for i, c in enumerate(host.calls) if c[0] == "atomic_write" and c[1] == IMAGES / "a.img.new")
    truncate = next(i for i, c in enumerate(host.calls) if c[0] == "run" and c[1][0] == "truncate")
    assert made < truncate and host.calls[made][3:] == (0, 0, 0o600)


def test_an_older_world_readable_image_is_made_private(host) -> None:  # type: ignore[no-untyped-def]
    host.add_file(IMAGES / "a.img", b"\0" * 2048, mode=0o644)
    image_disk(host).prepare_home("a", 1001, 1001, HOMES / "a", 1)
    assert ["chmod", "600", str(IMAGES / "a.img")] in host.commands


def test_a_home_with_content_is_carried_over_as_the_sliver_never_as_root(host) -> None:  # type: ignore[no-untyped-def]
    host.answers[("find", str(HOMES / "a"), "-mindepth", "1", "-maxdepth", "1")] = (0, b"/home/a/notes\n")
    image_disk(host).prepare_home("a", 1001, 1002, HOMES / "a", 20480)
    staging = HOMES / ".nodemanager-staging-a"
    assert [argv for uid, gid, groups, argv in host.ran_as] == [
        ("cp", "-a", "--", f"{HOMES / 'a'}/.", f"{staging}/"),
        ("find", str(HOMES / "a"), "-mindepth", "1", "-delete"),
    ]
    assert {(uid, gid, groups) for uid, gid, groups, _ in host.ran_as} == {(1001, 1002, (1002,))}
    copies_and_deletes = [c for c in host.commands if c[0] == "cp" or (c[0] == "find" and "-delete" in c)]
    assert copies_and_deletes == [list(argv) for *_, argv in host.ran_as]  # each of them ran as the sliver
    mounts = host.commands_named("mount")
    assert mounts == [["mount", "-o", "loop,nosuid,nodev", str(IMAGES / "a.img"), str(staging)],
                      ["mount", "-o", "loop,nosuid,nodev", str(IMAGES / "a.img"), str(HOMES / "a")]]
    assert staging not in host.dirs  # removed again


def test_overcommit_is_a_note(host) -> None:  # type: ignore[no-untyped-def]
    disk = image_disk(host)
    host.answers[("find", str(IMAGES), "-maxdepth", "1", "-name", "*.img", "-printf", "%s %b\n")] = (
        0, b"1073741824 8\n1073741824 2048\n")  # two 1 GiB images, almost empty
    host.answers[("stat", "-f")] = (0, b"256 4096\n")  # 1 MiB free
    note = disk.overcommit()
    assert note is not None and "overcommitted" in note and "2046 MiB" in note and "1 MiB free" in note
    assert note in disk.apply({}, {}, {})
    host.answers[("stat", "-f")] = (0, b"1048576 4096\n")  # 4 GiB free
    assert disk.overcommit() is None and disk.apply({}, {}, {}) == ()


def test_the_sweep_removes_images_and_staging_points_of_accounts_not_kept(host) -> None:  # type: ignore[no-untyped-def]
    for name in ("kept.img", "gone.img", "half.img.new", "notes.txt"):
        host.add_file(IMAGES / name, b"x")
    host.dirs[HOMES / ".nodemanager-staging-ghost"] = (0, 0, 0o700)
    host.dirs[HOMES / ".nodemanager-staging-kept"] = (0, 0, 0o700)  # a carry-over cut short by a crash
    host.dirs[HOMES / "kept"] = (1001, 1001, 0o700)
    disk = image_disk(host)
    assert disk.sweep({"kept"}) == ("ghost", "gone", "half")
    assert sorted(p.name for p in host.files if p.parent == IMAGES) == ["kept.img", "notes.txt"]
    assert not [p for p in host.dirs if p.name.startswith(".nodemanager-staging-")]
    assert disk.sweep({"kept"}) == ()
