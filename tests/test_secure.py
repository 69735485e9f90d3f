"""Secure deployment: the certificates and keys `fedfar certs` writes, the checks before any process starts, and
(marked `deploy`) a real TLS + SuperNode-auth federation on 127.0.0.1: registered nodes train a round, an
unregistered node and a node without the CA are refused."""
from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import json
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedfar.federation import certs, deploy, launch, processes

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # 3.10: the same parser, as installed with flwr
    import tomli as tomllib  # type: ignore[no-redef]

PROJECT = launch.PROJECT_DIR


def _load_demo():
    spec = importlib.util.spec_from_file_location("deploy_demo", PROJECT / "scripts" / "deploy_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> certs.CertPaths:
    return certs.generate(tmp_path_factory.mktemp("certs") / "c", hosts=["superlink.lab", "10.0.0.9"],
                          ips=["10.0.0.5"], supernodes=2)


def _verifier(ca_path: Path, name: x509.GeneralName):
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    return (PolicyBuilder().store(Store([ca])).time(datetime.datetime.now(datetime.timezone.utc))
            .build_server_verifier(name))


# ------------------------------------------------------------------------------------------------ certificates


def test_server_certificate_verifies_against_the_ca_for_exactly_the_names_asked(keys):
    server = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"superlink.lab", "localhost"}
    assert set(map(str, san.get_values_for_type(x509.IPAddress))) == {"10.0.0.5", "10.0.0.9", "127.0.0.1"}
    # Full RFC 5280 path validation, as a strict TLS client does it, for every name asked for ...
    for name in (x509.DNSName("superlink.lab"), x509.DNSName("localhost"),
                 x509.IPAddress(ipaddress.ip_address("10.0.0.5")), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        _verifier(keys.ca_cert, name).verify(server, [])
    # ... and for none other
    for name in (x509.DNSName("other.lab"), x509.IPAddress(ipaddress.ip_address("10.0.0.6"))):
        with pytest.raises(VerificationError):
            _verifier(keys.ca_cert, name).verify(server, [])
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_server_certificate_of_another_ca_does_not_verify(keys, tmp_path):
    other = certs.generate(tmp_path / "other", supernodes=0)
    server = x509.load_pem_x509_certificate(other.server_cert.read_bytes())
    with pytest.raises(VerificationError):
        _verifier(keys.ca_cert, x509.DNSName("localhost")).verify(server, [])


def test_node_keys_are_p384_pairs_in_the_formats_flower_reads(keys):
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` runs
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    seen = set()
    for i in range(2):
        assert keys.node_key(i).read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        # flower-supernode's --auth-supernode-private-key: load_ssh_private_key, unencrypted
        private = serialization.load_ssh_private_key(keys.node_key(i).read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert keys.node_pub(i).read_text().startswith("ecdsa-sha2-nistp384 ")
        assert try_load_public_key(keys.node_pub(i)) == public_key_to_bytes(private.public_key())
        seen.add(keys.node_pub(i).read_bytes())
    assert len(seen) == 2  # one pair per node


def test_private_files_are_0600_and_the_folder_0700(keys):
    for path in (keys.ca_key, keys.server_key, keys.node_key(0), keys.node_key(1)):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert keys.folder.stat().st_mode & 0o777 == 0o700
    for path in (keys.ca_cert, keys.server_cert, keys.node_pub(0)):
        assert path.stat().st_mode & 0o077 != 0o077  # public files: nobody gets write access
    certs.check(keys.ca_cert, keys.server_cert, keys.server_key, [keys.node_key(0)], [keys.node_pub(0)])


def test_an_existing_folder_is_not_overwritten_unless_asked(tmp_path):
    first = certs.generate(tmp_path / "c", supernodes=3)
    ca = first.ca_cert.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        certs.generate(tmp_path / "c", supernodes=3)
    assert first.ca_cert.read_bytes() == ca
    first.node_key(0).chmod(0o644)
    again = certs.generate(tmp_path / "c", supernodes=1, overwrite=True)
    assert again.ca_cert.read_bytes() != ca
    assert sorted(p.name for p in again.folder.glob("supernode-*")) == ["supernode-0.key", "supernode-0.pub"]
    assert again.node_key(0).stat().st_mode & 0o777 == 0o600  # a looser mode left from before is fixed


def test_names_that_are_not_what_they_claim_are_refused(tmp_path):
    with pytest.raises(certs.CertError, match="superlink.lab.*not an IP"):
        certs.generate(tmp_path / "a", ips=["superlink.lab"])
    with pytest.raises(certs.CertError, match="not a host name"):
        certs.generate(tmp_path / "b", hosts=["https://superlink.lab"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


# ------------------------------------------------------------------------------------------------ checks


def test_check_names_a_missing_file_and_the_fix(keys, tmp_path):
    missing = tmp_path / "nowhere" / "ca.crt"
    with pytest.raises(certs.CertError) as err:
        certs.check(missing, keys.server_cert, keys.server_key)
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)
    assert "fedfar certs --out" in str(err.value)


def test_check_names_an_unreadable_file(keys, monkeypatch):
    real = Path.read_bytes

    def read_bytes(self):  # tests run as root here, where chmod 000 does not stop a read
        if self == keys.server_key:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(certs.CertError, match=rf"server key {re.escape(str(keys.server_key))} cannot be read "
                                              r"\(Permission denied\)"):
        certs.check(keys.ca_cert, keys.server_cert, keys.server_key)


@pytest.mark.parametrize("which", ["ca_cert", "server_cert", "server_key", "node_keys", "node_pubs"])
def test_check_names_a_file_that_does_not_parse(keys, tmp_path, which):
    bad = tmp_path / f"bad-{which}"
    bad.write_text("-----BEGIN SOMETHING-----\nnot base64 at all\n")
    files = dict(ca_cert=keys.ca_cert, server_cert=keys.server_cert, server_key=keys.server_key,
                 node_keys=[keys.node_key(0)], node_pubs=[keys.node_pub(0)])
    files[which] = [bad] if which.startswith("node") else bad
    with pytest.raises(certs.CertError, match=re.escape(str(bad))):
        certs.check(**files)


def test_check_refuses_files_that_do_not_belong_together(keys, tmp_path):
    other = certs.generate(tmp_path / "other", supernodes=1)
    with pytest.raises(certs.CertError, match="was not issued by the CA"):
        certs.check(keys.ca_cert, other.server_cert)
    with pytest.raises(certs.CertError, match="does not belong to the certificate"):
        certs.check(keys.ca_cert, keys.server_cert, other.server_key)
    pem = tmp_path / "pem.key"  # a P-384 key, but PEM: flower-supernode would refuse it at start-up
    pem.write_bytes(serialization.load_ssh_private_key(keys.node_key(0).read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(certs.CertError, match="not an unencrypted OpenSSH EC key"):
        certs.check(node_keys=[pem])


def test_cli_writes_a_folder_and_refuses_to_overwrite_it(tmp_path, capsys):
    from fedfar.cli import main

    out = tmp_path / "c"
    main(["certs", "--out", str(out), "--hosts", "superlink.lab", "--ips", "10.0.0.5", "--supernodes", "1"])
    assert "superlink.lab, localhost, 10.0.0.5, 127.0.0.1" in capsys.readouterr().out
    written = certs.CertPaths(out)
    certs.check(written.ca_cert, written.server_cert, written.server_key, [written.node_key(0)],
                [written.node_pub(0)])
    with pytest.raises(SystemExit) as code:
        main(["certs", "--out", str(out)])
    assert code.value.code == 2 and "not empty" in capsys.readouterr().err


def test_demo_stops_on_bad_certs_before_any_process_starts(tmp_path, monkeypatch):
    demo = _load_demo()
    started = []
    monkeypatch.setattr(demo.deploy, "start_server", lambda *a, **k: started.append(a))
    with pytest.raises(SystemExit, match=rf"--certs: CA certificate {re.escape(str(tmp_path))}/ca\.crt does not "
                                         r"exist: run `fedfar certs --out .* --supernodes 2` first"):
        demo.main(["--certs", str(tmp_path)])
    partial = certs.generate(tmp_path / "partial", supernodes=1)  # the demo needs two nodes
    with pytest.raises(SystemExit, match=r"supernode-1\.key does not exist"):
        demo.main(["--certs", str(partial.folder)])
    assert started == []


def test_commands_and_connection_are_secure_unless_insecure_is_asked(keys, tmp_path):
    link = deploy.superlink_command(9000, tmp_path / "state.db", keys)
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert link[link.index("--ssl-ca-certfile") + 1] == str(keys.ca_cert)
    assert "--insecure" in deploy.superlink_command(9000, tmp_path / "state.db", None)
    node = deploy.supernode_command("127.0.0.1:9000", 9001, "partition-id=0", keys.ca_cert, keys.node_key(0))
    assert "--insecure" not in node
    assert node[node.index("--root-certificates") + 1] == str(keys.ca_cert)
    assert node[node.index("--auth-supernode-private-key") + 1] == str(keys.node_key(0))
    assert "--insecure" in deploy.supernode_command("127.0.0.1:9000", 9001, "partition-id=0", None)

    path = deploy.write_connection(tmp_path, "x", "127.0.0.1:9000", None)
    assert tomllib.loads(path.read_text())["superlink"]["x"] == {"address": "127.0.0.1:9000", "insecure": True}
    deploy.write_connection(tmp_path, "x", "127.0.0.1:9000", keys.ca_cert)
    entry = tomllib.loads(path.read_text())["superlink"]["x"]
    assert entry == {"address": "127.0.0.1:9000", "root-certificates": str(keys.ca_cert.resolve())}


# ------------------------------------------------------------------------------------------------ end to end

CONNECTION = "fedfar-secure-test"
STARTUP_S = 900.0  # generous: on 2 busy cores one Flower process start takes minutes of wall time


def _wait_for_lines(log: Path, pattern: str, count: int, timeout: float, procs: dict) -> list[str]:
    """The first `count` matches of `pattern` in a log (no extra processes, unlike polling `flwr`)."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.findall(pattern, launch.ANSI.sub("", log.read_text(errors="replace"))) if log.is_file() else []
        if len(found) >= count:
            return found
        for name, proc in procs.items():
            if proc.poll() is not None and name in ("superlink", "node0", "node1"):
                raise RuntimeError(f"{name} exited with code {proc.returncode}" + launch.tail_logs([log]))
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} x {pattern!r} not in {log} after {timeout:.0f} s" + launch.tail_logs([log]))
        time.sleep(2.0)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """One secure SuperLink; nodes 0 and 1 registered (node 0 with its warm worker, node 1 without); a node with
    a key nobody registered; a node with a registered key but another CA as root certificate. One tiny round (1 round, no priming: the `random`
    selection draws the mask on the server, so each node runs only 2 ClientApp processes). Everything is
    stopped by process id before the tests look at what happened."""
    work = tmp_path_factory.mktemp("secure-federation")
    keys = certs.generate(work / "certs", supernodes=3)  # 0, 1 train; 2 is registered but gets the wrong CA
    rogue = certs.generate(work / "rogue", supernodes=1)  # another CA and a key pair nobody registered
    env = launch.flower_env(PROJECT) | {"FLWR_HOME": str(work / "flwr-home")}
    logs = {name: work / f"{name}.log" for name in ("superlink", "worker0", "node0", "node1", "unregistered",
                                                    "wrong-ca")}
    procs: dict[str, subprocess.Popen] = {}
    out = SimpleNamespace(keys=keys, rogue=rogue, logs=logs, work=work, exit_codes={}, statuses={}, code=None,
                          left=set())
    try:
        port = launch.free_port()
        procs["superlink"] = deploy.start_server(deploy.superlink_command(port, work / "state.db", keys),
                                                 env, PROJECT, logs["superlink"])
        launch.wait_healthy(procs["superlink"], port, "flower-superlink", [logs["superlink"]], timeout=STARTUP_S,
                            ca=keys.ca_cert)
        deploy.write_connection(work / "flwr-home", CONNECTION, f"127.0.0.1:{port}", keys.ca_cert)
        out.node_ids = [deploy.register_supernode(keys.node_pub(i), CONNECTION, env, PROJECT) for i in range(3)]

        (work / "node0").mkdir()
        worker_ready = work / "node0" / "ready"
        procs["worker0"] = deploy.start_server(deploy.node_worker_command(work / "node0" / "w.sock", worker_ready),
                                               env, PROJECT, logs["worker0"])
        used = {port}
        starts = {"node0": (keys.ca_cert, keys.node_key(0)), "node1": (keys.ca_cert, keys.node_key(1)),
                  "unregistered": (keys.ca_cert, rogue.node_key(0)), "wrong-ca": (rogue.ca_cert, keys.node_key(2))}
        for i, (name, (ca, key)) in enumerate(starts.items()):
            used.add(node_port := launch.free_port(used))
            worker = f" worker='{work / 'node0' / 'w.sock'}'" if name == "node0" else ""
            command = deploy.supernode_command(f"127.0.0.1:{port}", node_port,
                                               f"partition-id={i % 2} num-partitions=2{worker}", ca, key,
                                               extra=["--max-retries", "2", "--max-wait-time", "120"])
            procs[name] = deploy.start_server(command, env, PROJECT, logs[name])
        _wait_for_lines(logs["superlink"], r"Activated node_id=(\d+)", 2, STARTUP_S, procs)
        for name in ("unregistered", "wrong-ca"):  # both must have given up before the run starts
            try:
                out.exit_codes[name] = procs[name].wait(timeout=STARTUP_S)
            except subprocess.TimeoutExpired:
                out.exit_codes[name] = None
        out.statuses = deploy.node_statuses(CONNECTION, env, PROJECT)
        deploy.wait_for_workers([worker_ready], [procs["worker0"]], [logs["worker0"]], timeout=STARTUP_S)

        overrides = {"num-rounds": 1, "method": "random25-emb", "save-model": False, "run-name": "secure",
                     "results-dir": str(work / "results")}
        run_config = launch.run_config_args(PROJECT / "configs" / "tiny.toml", overrides, PROJECT)
        out.code = launch.flwr_run(PROJECT, CONNECTION, env, run_config, stream=False,
                                   log_path=work / "flwr-run.log")
        out.results = work / "results" / "secure"
    finally:
        for proc in reversed(list(procs.values())):  # SuperNodes first, so they do not retry a vanished SuperLink
            processes.stop_process_tree(proc)
        out.left = set().union(*(processes.process_tree(p.pid) for p in procs.values())) if procs else set()
    return out


def _superlink_log(federation) -> str:
    return launch.ANSI.sub("", federation.logs["superlink"].read_text(errors="replace"))


def _activated(federation) -> set[int]:
    return {int(n) for n in re.findall(r"Activated node_id=(\d+)", _superlink_log(federation))}


@pytest.mark.deploy
def test_registered_nodes_train_a_round_over_tls(federation):
    assert federation.code == 0, launch.tail_logs([federation.work / "flwr-run.log", federation.logs["superlink"]])
    assert not federation.left, processes.describe(federation.left)
    registered = set(federation.node_ids[:2])
    ledger = [json.loads(line) for line in (federation.results / "ledger.jsonl").read_text().splitlines()]
    assert {e["node_id"] for e in ledger} == registered
    train = [e for e in ledger if e["phase"] == "train"]
    assert {e["node_id"] for e in train} == registered and all(e["status"] == "ok" for e in train)
    assert json.loads((federation.results / "summary.json").read_text())["clients"] == 2
    # Node 0's messages were served by its warm worker, node 1's by their own ClientApp processes; every message
    # reports its cold start from its ClientApp process's start either way.
    for partition, served in ((0, True), (1, False)):
        entries = [e for e in ledger if e.get("partition_id") == partition and e["phase"] == "train"]
        assert entries and all(("worker_s" in e) == served and e["cold_start_s"] > 0 for e in entries)
    for i in range(2):
        log = federation.logs[f"node{i}"].read_text(errors="replace")
        assert f"SuperNode ID: {federation.node_ids[i]}" in log
        assert "Receiving: train message" in log


@pytest.mark.deploy
def test_an_unregistered_node_is_refused_and_never_receives_a_message(federation):
    log = launch.ANSI.sub("", federation.logs["unregistered"].read_text(errors="replace"))
    # It gave up by itself before the run (Flower's exit code 305, SUPERNODE_CONNECTION_ERROR, is printed; the
    # process exits with 1): the SuperLink answered "Failed to activate SuperNode" (HTTP 412).
    assert federation.exit_codes["unregistered"] not in (None, 0), log[-3000:]
    assert "Exit Code: 305" in log and "Failed to activate SuperNode" in log
    assert "SuperNode ID:" not in log and "Receiving:" not in log  # never got an id, never pulled a message
    # The SuperLink refused exactly this key, once, and activated only the two registered nodes.
    link = _superlink_log(federation)
    rogue = serialization.load_ssh_private_key(federation.rogue.node_key(0).read_bytes(), None).public_key()
    pem = rogue.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    refused = [line for line in link.splitlines() if "ApiError:2004" in line]
    assert len(refused) == 1 and repr(pem)[2:-1] in refused[0], refused
    assert len(re.findall(r'"POST /v1/fleet/activate-node HTTP/1.1" 412', link)) == 1
    assert _activated(federation) == set(federation.node_ids[:2])
    assert {n for n, s in federation.statuses.items() if s == "online"} == set(federation.node_ids[:2])
    assert len(federation.statuses) == 3  # the refused key did not become a node of the federation


@pytest.mark.deploy
def test_a_node_without_the_ca_cannot_connect(federation):
    log = launch.ANSI.sub("", federation.logs["wrong-ca"].read_text(errors="replace"))
    assert federation.exit_codes["wrong-ca"] not in (None, 0), log[-3000:]
    assert "Exit Code: 305" in log and "CERTIFICATE_VERIFY_FAILED" in log
    assert "SuperNode ID:" not in log and "Receiving:" not in log
    # its key is registered, yet it never got past TLS: registered, never online
    assert federation.statuses[federation.node_ids[2]] == "registered"
    assert federation.node_ids[2] not in _activated(federation)
    # TLS failed before any request: the SuperLink saw activate-node from nodes 0 and 1 and the unregistered one
    assert len(re.findall(r'"POST /v1/fleet/activate-node HTTP/1.1"', _superlink_log(federation))) == 3
