"""Who may call the coordinator is one table, and the servicer is built from it.

`_admission.RULES` names who may call each method of the Coordinator service; the servicer's
gRPC methods are generated from it (`service._serve_admitted`), each admitting its caller
before its handler runs. These tests pin the table to the service and to the rules the
threat model states, and show that a method without a rule or a handler cannot be served.
(`tests/integration/test_coordinator_admission.py` shows every method of a running
coordinator refusing a caller before it looks at the request.)
"""

from __future__ import annotations

import pytest

from domain_coordinator import service
from domain_coordinator._admission import RULES, HostAccess
from domain_coordinator.service import CoordinatorService, handler_name
from domain_proto import services_pb2, services_pb2_grpc

pytestmark = pytest.mark.unit

METHODS = services_pb2.DESCRIPTOR.services_by_name["Coordinator"].methods


def test_every_method_of_the_service_has_exactly_one_rule() -> None:
    assert sorted(RULES) == sorted(m.name for m in METHODS)


def test_every_method_of_the_servicer_admits_by_its_rule_then_runs_its_handler() -> None:
    for method in METHODS:
        served = CoordinatorService.__dict__[method.name]
        assert served.admission_rule is RULES[method.name], method.name
        assert callable(CoordinatorService.__dict__[handler_name(method.name)]), method.name
    assert handler_name("SubmitProposal") == "submit_proposal"
    assert handler_name("ListHsas") == "list_hsas"


def test_hsa_only_methods_are_exactly_the_ones_the_threat_model_names() -> None:
    hosts = {name: rule.hosts for name, rule in RULES.items() if rule.hosts is not None}
    assert hosts == {
        "GetKey": HostAccess.MEMBER,
        "PutKey": HostAccess.MEMBER,
        "ListKeyRecords": HostAccess.MEMBER,
        "DeleteKeyRecord": HostAccess.MEMBER,
        "RegisterHsa": HostAccess.MEMBER_OR_JOINING,
        "WatchStates": HostAccess.MEMBER_OR_JOINING,
    }
    priced = sorted(name for name, rule in RULES.items() if rule.price is not None)
    assert priced == ["GetStatesAfter", "ListProposals"]


def _handlers(leave_out: str = "") -> dict[str, object]:
    return {
        handler_name(m.name): CoordinatorService.__dict__[handler_name(m.name)]
        for m in METHODS
        if m.name != leave_out
    }


def test_a_method_without_a_rule_cannot_be_served(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "RULES", {k: v for k, v in RULES.items() if k != "PutKey"})
    servicer = type("Servicer", (services_pb2_grpc.CoordinatorServicer,), _handlers())
    with pytest.raises(TypeError, match=r"no rule for \['PutKey'\]"):
        service._serve_admitted(servicer)


def test_a_method_without_a_handler_cannot_be_served() -> None:
    servicer = type("Servicer", (services_pb2_grpc.CoordinatorServicer,), _handlers("PutKey"))
    with pytest.raises(TypeError, match="Servicer has no handler put_key for PutKey"):
        service._serve_admitted(servicer)
    complete = type("Servicer", (services_pb2_grpc.CoordinatorServicer,), _handlers())
    assert service._serve_admitted(complete).PutKey.admission_rule is RULES["PutKey"]
