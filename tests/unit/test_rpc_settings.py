"""Settings of the cohort service: config rules, who needs a token, where the token comes from, data fingerprints."""

import pytest

from rdml_dist.config import RpcConfig, parse_config
from rdml_dist.data import DataSpec, data_fingerprint, load_dataset
from rdml_dist.errors import ConfigError
from rdml_dist.lane.server import lane_host, lanes_reach
from rdml_dist.rpc.auth import bearer_metadata, check_bind, is_loopback, resolve_token


def _cohort(**rpc: object) -> dict:
    return {"students": [{"model": "mlp"}, {"model": "mlp", "name": "far", "external": True}], "rpc": rpc}


def test_external_students_need_a_fixed_port_of_an_enabled_service() -> None:
    assert parse_config(_cohort(port=50151)).external_students() == ["far"]
    for rpc in ({"port": 0}, {"port": 50151, "enabled": False}):
        with pytest.raises(ConfigError, match="external students need the cohort service at a fixed address"):
            parse_config(_cohort(**rpc))


def test_tls_needs_both_certificate_and_key() -> None:
    with pytest.raises(ConfigError, match="rpc: .*tls_cert_file and tls_key_file go together"):
        parse_config({"students": [{"model": "mlp"}], "rpc": {"tls_cert_file": "cert.pem"}})


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.5.0.1", True), ("::1", True), ("localhost", True),
                                           ("0.0.0.0", False), ("10.0.0.5", False), ("::", False), ("head.example", False)])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_bind_beyond_loopback_needs_a_token_and_tls_or_an_explicit_plaintext() -> None:
    check_bind(RpcConfig(), None)  # loopback: no token needed
    with pytest.raises(ConfigError, match="rpc.host: 0.0.0.0 is not a loopback address and the cohort service has no token"):
        check_bind(RpcConfig(host="0.0.0.0"), None)
    with pytest.raises(ConfigError, match="has no TLS: set rpc.tls_cert_file"):
        check_bind(RpcConfig(host="0.0.0.0"), "token")
    check_bind(RpcConfig(host="0.0.0.0", tls_cert_file="c.pem", tls_key_file="k.pem"), "token")
    check_bind(RpcConfig(host="0.0.0.0", allow_plaintext=True), "token")
    with pytest.raises(ConfigError, match="no token"):
        check_bind(RpcConfig(host="0.0.0.0", allow_plaintext=True), None)


def test_the_frame_lane_listens_beyond_loopback_only_when_allowed() -> None:
    """The cohort service's rule for the frame lane: its frames travel in clear, so a non-loopback bind is explicit."""
    assert lane_host("10.0.0.5", allow_plaintext=False) == "127.0.0.1"
    assert lane_host("10.0.0.5", allow_plaintext=True) == "10.0.0.5"
    assert lane_host("127.0.0.1", allow_plaintext=False) == "127.0.0.1"  # every node on this machine
    # a student on another node than a loopback-only lane exchanges through Ray's calls; on the lane's node, over it
    shards = [("node-a", "10.0.0.5"), ("node-b", "10.0.0.6")]
    assert not lanes_reach("node-a", shards, allow_plaintext=False) and not lanes_reach(None, shards, allow_plaintext=False)
    assert lanes_reach("node-a", shards[:1], allow_plaintext=False) and lanes_reach("node-c", shards, allow_plaintext=True)
    assert lanes_reach("node-c", [("node-a", "127.0.0.1")], allow_plaintext=False)  # simulated nodes on one machine
    assert parse_config({"students": [{"model": "mlp"}], "runtime": {"exchange": {"allow_plaintext": True}}}).runtime.exchange.allow_plaintext


def test_the_token_comes_from_the_command_line_the_config_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RDML_RPC_TOKEN", raising=False)
    assert resolve_token(RpcConfig()) is None and bearer_metadata(None) == ()
    monkeypatch.setenv("RDML_RPC_TOKEN", "from-env")
    assert resolve_token(RpcConfig()) == "from-env"
    assert resolve_token(RpcConfig(token="from-config")) == "from-config"
    assert resolve_token(RpcConfig(token="from-config"), "given") == "given"
    monkeypatch.setenv("MY_TOKEN", "mine")
    assert resolve_token(RpcConfig(token_env="MY_TOKEN")) == "mine"
    assert bearer_metadata("t") == (("authorization", "Bearer t"),)


def test_the_data_fingerprint_sees_what_sizes_do_not() -> None:
    spec = DataSpec(name="digits", val_fraction=0.2)
    same = data_fingerprint(load_dataset(spec, seed=0))
    assert same == data_fingerprint(load_dataset(spec, seed=0)) and len(same) == 16
    assert data_fingerprint(load_dataset(spec, seed=1)) != same  # another split, same sizes
    assert data_fingerprint(load_dataset(DataSpec(name="digits", val_fraction=0.2, label_noise=0.3), seed=0)) != same
