"""Files reached through descriptors (patchbox/safefs.py) and the root tools that use them:
the trust directory, the store, `sign`, `keygen`. Where another user acts, nobody does
it for real (setpriv, in a directory under /tmp it can reach) and root's tool runs
after: the attack must fail, and what it aimed at must be untouched (docs/security.md,
"Client, host tools and Ansible")."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from helpers import NOBODY_UID, NOGROUP_GID, make_patch, nobody_dir, nobody_python
from patchbox import config, safefs, signing, store
from patchbox.cli.main import cli
from patchbox.errors import ConfigError
from patchbox.format.layout import read_patch_file, save_patch, split_signature


def run(*args: str) -> Result:
    return CliRunner(mix_stderr=False).invoke(cli, list(args), catch_exceptions=False)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# -- safefs itself ------------------------------------------------------------------------


def test_walk_refuses_a_link_anywhere_and_names_it(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    fd = safefs.walk(real / "sub")
    assert fd is not None
    os.close(fd)
    for path in (tmp_path / "link", tmp_path / "link" / "sub"):
        with pytest.raises(safefs.UnsafePathError, match=r"link is a symbolic link \(to "):
            safefs.walk(path)
    (tmp_path / "file").write_text("")
    with pytest.raises(safefs.UnsafePathError, match="file is not a directory"):
        safefs.walk(tmp_path / "file" / "x")
    with pytest.raises(FileNotFoundError):
        safefs.walk(tmp_path / "missing")
    assert safefs.walk(tmp_path / "missing" / "x", missing_ok=True) is None


def test_walk_owners_modes_and_sticky(tmp_path: Path) -> None:
    owners = frozenset({0, os.geteuid()})
    d = tmp_path / "d"
    d.mkdir(mode=0o755)
    os.close(safefs.walk(d, owners=owners) or -1)
    d.chmod(0o775)
    with pytest.raises(
        safefs.UnsafePathError, match=r"d is writable by others \(owner uid \d+, mode 0775\)"
    ):
        safefs.walk(d, owners=owners)
    # A /tmp-like directory (sticky, world-writable) passes above, not as the last one.
    d.chmod(0o1777)
    (d / "inner").mkdir(mode=0o755)
    if os.geteuid() == 0:
        os.close(safefs.walk(d / "inner", owners=owners) or -1)
    with pytest.raises(safefs.UnsafePathError, match="writable by others"):
        safefs.walk(d, owners=owners)
    with pytest.raises(safefs.UnsafePathError, match=r"is owned by uid \d+, not root"):
        safefs.walk(d / "inner", owners=frozenset({123456}))


def test_walk_creates_with_its_mode_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        fd = safefs.walk(tmp_path / "a" / "b", create_mode=0o755)
    finally:
        os.umask(old)
    assert fd is not None
    os.close(fd)
    assert mode_of(tmp_path / "a") == mode_of(tmp_path / "a" / "b") == 0o755


def test_replace_file_replaces_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "out").symlink_to(victim)
    fd = os.open(tmp_path, safefs.DIR_FLAGS)
    try:
        old = os.umask(0o077)
        try:
            safefs.replace_file(fd, "out", b"new", 0o644)
        finally:
            os.umask(old)
    finally:
        os.close(fd)
    assert victim.read_text() == "keep"
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out").read_text() == "new"
    assert mode_of(tmp_path / "out") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "victim"]  # no temp left


# -- sign and keygen in a directory others can write to ------------------------------------


def test_sign_does_not_write_through_a_link_nobody_planted(world_dir: Path, tmp_path: Path) -> None:
    """Root signs a patch lying in a /tmp-like directory; nobody planted the name `sign`
    used to write first (FILE.sign-tmp) as a link to a root file. Before, root wrote the
    signed bytes through it."""
    shared = world_dir / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    victim = world_dir / "victim"  # root's, where nobody cannot write
    victim.write_text("root's file\n")
    pbx = shared / "fix.pbx"
    save_patch(make_patch(), pbx)
    nobody_python("import os, sys; os.symlink(sys.argv[1], sys.argv[2])", victim, f"{pbx}.sign-tmp")
    assert run("keygen", "--out", str(tmp_path / "k")).exit_code == 0
    result = run("sign", "--key", str(tmp_path / "k.key"), str(pbx))
    assert result.exit_code == 0, result.stderr
    assert victim.read_text() == "root's file\n"
    assert split_signature(read_patch_file(pbx).data) is not None
    assert os.readlink(f"{pbx}.sign-tmp") == str(victim)  # nobody's link, left alone


def test_keygen_refuses_a_dangling_link_nobody_planted(world_dir: Path) -> None:
    """nobody plants NAME.pub -> a file that does not exist yet; root's keygen used to
    create that file (exists() follows links and said no)."""
    shared = world_dir / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    target = world_dir / "created-by-root"
    nobody_python(
        "import os, sys; os.symlink(sys.argv[1], sys.argv[2])", target, shared / "ops.pub"
    )
    result = run("keygen", "--out", str(shared / "ops"))
    assert result.exit_code == 1 and "ops.pub exists: not overwriting" in result.stderr
    assert not target.exists() and not (shared / "ops.key").exists()


# -- the trust directory -----------------------------------------------------------------


@pytest.fixture()
def signed(tmp_path: Path) -> dict[str, Path]:
    """A key pair and a patch signed with it (the key may be put in a trust directory)."""
    assert run("keygen", "--out", str(tmp_path / "keys" / "ops")).exit_code == 0
    pbx = tmp_path / "fix.pbx"
    save_patch(make_patch(), pbx)
    assert run("sign", "--key", str(tmp_path / "keys" / "ops.key"), str(pbx)).exit_code == 0
    return {"pub": tmp_path / "keys" / "ops.pub", "patch": pbx}


def apply_missing(trust: Path, patch: Path) -> Result:
    """`apply` to a socket that does not exist: passing the trust check shows as the
    connect error, failing it as the trust error (nothing is ever sent)."""
    return run("apply", "-s", str(trust.parent / "no-sock"), "--trust-dir", str(trust), str(patch))


def trust_dir_with(parent: Path, pub: Path, mode: int = 0o755) -> Path:
    trust = parent / "trusted"
    trust.mkdir()
    (trust / "ops.pub").write_bytes(pub.read_bytes())
    (trust / "ops.pub").chmod(0o644)
    trust.chmod(mode)
    return trust


def test_a_safe_trust_directory_below_a_sticky_one_is_used(
    world_dir: Path, signed: dict[str, Path]
) -> None:
    sticky = world_dir / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    trust = trust_dir_with(sticky, signed["pub"])
    result = apply_missing(trust, signed["patch"])
    assert result.exit_code == 1 and "no agent socket" in result.stderr, result.stderr


def test_trust_directory_others_can_write_is_refused(
    world_dir: Path, signed: dict[str, Path]
) -> None:
    """The trust directory is root's, group nogroup, 0775: nobody (group nogroup) drops
    its own key in. Refused, naming the directory, its owner and mode."""
    trust = trust_dir_with(world_dir, signed["pub"], 0o775)
    os.chown(trust, 0, NOGROUP_GID)
    nobody_python(
        "open(__import__('sys').argv[1], 'w').write('not even a key')", trust / "nobody.pub"
    )
    result = apply_missing(trust, signed["patch"])
    assert result.exit_code == 1, result.stderr
    assert f"trust directory {trust}: {trust} is writable by others (owner uid 0, mode 0775)" in (
        result.stderr
    )
    result = run(
        "install",
        "--store",
        str(world_dir / "store"),
        "--trust-dir",
        str(trust),
        str(signed["patch"]),
    )
    assert result.exit_code == 1 and "is writable by others" in result.stderr
    assert not (world_dir / "store").exists()


def test_trust_directory_in_a_directory_nobody_owns_is_refused(
    world_dir: Path, signed: dict[str, Path]
) -> None:
    """nobody owns a directory above the trust directory: it could rename the trust
    directory away and put its own in its place."""
    parent = nobody_dir(world_dir, "nobody")
    os.mkdir(parent / "trusted")  # root's, 0755, with root's key: still refused
    (parent / "trusted" / "ops.pub").write_bytes(signed["pub"].read_bytes())
    result = apply_missing(parent / "trusted", signed["patch"])
    assert result.exit_code == 1
    assert (
        f"{parent} is owned by uid {NOBODY_UID}, not root (owner uid {NOBODY_UID}, mode 0755)"
        in (result.stderr)
    ), result.stderr


def test_trusted_key_nobody_owns_or_links_is_refused(
    world_dir: Path, signed: dict[str, Path]
) -> None:
    trust = trust_dir_with(world_dir, signed["pub"])
    os.chown(trust / "ops.pub", NOBODY_UID, NOGROUP_GID)
    result = apply_missing(trust, signed["patch"])
    assert result.exit_code == 1
    assert f"trusted key {trust / 'ops.pub'} is owned by uid {NOBODY_UID}" in result.stderr
    # A key that is a link: whoever can change the link chooses the key. Not followed.
    (trust / "ops.pub").unlink()
    (trust / "ops.pub").symlink_to(signed["pub"])
    result = apply_missing(trust, signed["patch"])
    assert result.exit_code == 1 and "ops.pub is a symbolic link: not followed" in result.stderr


def test_trust_directory_that_is_a_link_is_refused(tmp_path: Path, signed: dict[str, Path]) -> None:
    trust = trust_dir_with(tmp_path, signed["pub"])
    (tmp_path / "via-link").symlink_to(trust)
    result = apply_missing(tmp_path / "via-link", signed["patch"])
    assert result.exit_code == 1 and "via-link is a symbolic link (to " in result.stderr
    assert apply_missing(trust, signed["patch"]).stderr.count("no agent socket") == 1


def test_trust_keys_are_read_without_following_and_checked(
    tmp_path: Path, signed: dict[str, Path]
) -> None:
    trust = trust_dir_with(tmp_path, signed["pub"])
    keys = signing.trusted_keys(signing.Trust(trust, True))
    assert keys is not None and [p.name for p, _k in keys.values()] == ["ops.pub"]
    (trust / "ops.pub").chmod(0o666)
    with pytest.raises(
        signing.TrustError, match=r"ops.pub is writable by others \(owner uid \d+, mode 0666\)"
    ):
        signing.trusted_keys(signing.Trust(trust, True))


# -- the store ----------------------------------------------------------------------------


def test_store_below_a_directory_nobody_owns_is_refused(
    world_dir: Path, signed: dict[str, Path]
) -> None:
    parent = nobody_dir(world_dir, "nobody")
    result = run("install", "--store", str(parent / "store"), str(signed["patch"]))
    assert result.exit_code == 1
    assert f"{parent} is owned by uid {NOBODY_UID}, not root" in result.stderr, result.stderr
    assert not (parent / "store").exists()  # nothing made where nobody could swap it


def test_store_through_a_link_nobody_planted_is_refused(
    world_dir: Path, signed: dict[str, Path]
) -> None:
    """nobody links a name in a /tmp-like directory to root's own directory: an install
    through it would write root's store where nobody chose (and nobody could swap the
    link for another)."""
    rootdir = world_dir / "root-only"
    rootdir.mkdir(mode=0o700)
    shared = world_dir / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    nobody_python("import os, sys; os.symlink(sys.argv[1], sys.argv[2])", rootdir, shared / "link")
    result = run("install", "--store", str(shared / "link" / "store"), str(signed["patch"]))
    assert result.exit_code == 1 and "link is a symbolic link (to " in result.stderr, result.stderr
    assert list(rootdir.iterdir()) == []


def test_store_install_and_uninstall_through_descriptors(
    tmp_path: Path, signed: dict[str, Path]
) -> None:
    root = tmp_path / "store"
    entry, pf = store.install(
        str(signed["patch"]), root=root, trust=signing.Trust(tmp_path / "none", False)
    )
    assert mode_of(root) == mode_of(entry.path.parent) == 0o755
    assert mode_of(entry.path) == 0o644 and entry.path.read_bytes() == pf.data
    # A link put in the store by its owner is replaced by a reinstall, not written through.
    victim = tmp_path / "victim"
    victim.write_text("keep")
    entry.path.unlink()
    entry.path.symlink_to(victim)
    again, _pf = store.install(str(signed["patch"]), root=root, pf=pf)
    assert again.path == entry.path and not again.path.is_symlink()
    assert victim.read_text() == "keep"
    assert [e.name for e in store.iter_installed(root)] == [pf.patch.name]
    assert store.iter_installed(root, "../../etc") == []  # a build-id from an agent's answer
    gone = store.uninstall(pf.patch.name, root=root)
    assert [g.path for g in gone] == [entry.path] and not entry.path.exists()


# -- the build-info cache --------------------------------------------------------------


def test_build_info_cache_others_can_write_is_refused(
    world_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object `config --libs` links into every program is cached under a name anyone
    can compute. In a cache others can write to, nobody plants it first: refused, and
    nobody's file is never handed to the linker."""
    cache = world_dir / "cache"
    cache.mkdir()
    cache.chmod(0o1777)
    monkeypatch.setenv("PATCHBOX_CACHE", str(cache))
    info = config.collect_build_info("1.0", "-O2", world_dir)
    digest = hashlib.sha256(config.build_info_source(info).encode()).hexdigest()[:20]
    planted = cache / f"build-info-{digest}.o"
    nobody_python("open(__import__('sys').argv[1], 'w').write('code of nobody')", planted)
    with pytest.raises(
        ConfigError,
        match=rf"cache directory {cache} is writable by others \(owner uid 0, mode 1777\)",
    ):
        config.build_info_object(info)
    cache.chmod(0o755)  # root's own again: the cached object is used (what nobody left)
    assert config.build_info_object(info) == planted
