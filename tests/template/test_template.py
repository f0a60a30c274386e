"""The SAM template's contract: routes and their auth, schedules, least-privilege IAM, env vars and sample events."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
EVENTS = ROOT / "events"
ENV_JSON = EVENTS / "env.json"

# Logical id -> directory under functions/ (DESIGN.md section 3).
FUNCTIONS: dict[str, str] = {
    "OAuthInitiateFunction": "oauth_initiate",
    "OAuthCallbackFunction": "oauth_callback",
    "TokenFetchFunction": "token_fetch",
    "TokenRevokeFunction": "token_revoke",
    "TokenRefresherFunction": "token_refresher",
    "KeyRotationFunction": "key_rotation",
}
DIRECTORY_TO_FUNCTION = {directory: logical_id for logical_id, directory in FUNCTIONS.items()}

# (method, path) -> (function, authorizer): the callback is the one public route.
ROUTES: dict[tuple[str, str], tuple[str, str]] = {
    ("POST", "/sonos/oauth/initiate"): ("OAuthInitiateFunction", "AWS_IAM"),
    ("GET", "/sonos/oauth/callback"): ("OAuthCallbackFunction", "NONE"),
    ("GET", "/sonos/token"): ("TokenFetchFunction", "AWS_IAM"),
    ("DELETE", "/sonos/token"): ("TokenRevokeFunction", "AWS_IAM"),
}
SCHEDULES = {"TokenRefresherFunction": "rate(5 minutes)", "KeyRotationFunction": "rate(30 days)"}
REDIS_FUNCTIONS = {
    "OAuthInitiateFunction",
    "OAuthCallbackFunction",
    "TokenFetchFunction",
    "TokenRevokeFunction",
    "TokenRefresherFunction",
}
EVENT_EMITTERS = {"TokenFetchFunction", "TokenRefresherFunction"}

PARAMETER_ARN_PREFIX = "arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:parameter/storytailor-${Env}/"
KEY_RING_PARAMETER_ARN = PARAMETER_ARN_PREFIX + "sonos/token-encryption-keys"
EVENT_BUS_ARN = "arn:${AWS::Partition}:events:${AWS::Region}:${AWS::AccountId}:event-bus/${EventBusName}"
SSM_VIA_SERVICE = "ssm.${AWS::Region}.amazonaws.com"

# DESIGN.md section 4 and the operational settings: every one must be declared so that
# `sam local invoke --env-vars` can set it (SAM drops variables the template lacks).
SETTINGS_ENV_VARS = {
    "SONOS_CLIENT_ID",
    "SONOS_CLIENT_SECRET",
    "SONOS_REDIRECT_URI",
    "TOKEN_ENCRYPTION_KEYS",
    "SUPABASE_URL",
    "SUPABASE_SERVICE_ROLE_KEY",
    "DATABASE_URL",
    "REDIS_URL",
    "SONOS_AUTH_BASE_URL",
    "SONOS_CONTROL_BASE_URL",
    "SONOS_SCOPE",
    "SONOS_REVOKE_URL",
    "REFRESH_AHEAD_SECONDS",
    "SONOS_LINK_SUCCESS_URL",
    "SONOS_LINK_FAILURE_URL",
    "EVENT_BUS_NAME",
    "ENV",
    "POWERTOOLS_SERVICE_NAME",
    "POWERTOOLS_METRICS_NAMESPACE",
    "LOG_LEVEL",
    "SSM_PARAMETER_MAX_AGE_SECONDS",
    "REFRESHER_CONCURRENCY",
    "REFRESHER_PERIOD_SECONDS",
    "SONOS_HTTP_TIMEOUT_SECONDS",
}
# Read from SSM at cold start in a deployed stack: the template must not carry a value.
SECRET_OR_SSM_ENV_VARS = {
    "SONOS_CLIENT_ID",
    "SONOS_CLIENT_SECRET",
    "TOKEN_ENCRYPTION_KEYS",
    "SUPABASE_URL",
    "SUPABASE_SERVICE_ROLE_KEY",
}


# --- a YAML loader that understands CloudFormation's short-form tags ------------------


class CloudFormationLoader(yaml.SafeLoader):
    """Reads ``!Ref x`` as ``{"Ref": "x"}``, ``!Sub s`` as ``{"Fn::Sub": "s"}``, and so on."""


def _short_form_constructor(tag: str) -> Any:
    long_name = tag if tag in ("Ref", "Condition") else f"Fn::{tag}"

    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
        value: Any
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            assert isinstance(node, yaml.MappingNode)
            value = loader.construct_mapping(node, deep=True)
        if tag == "GetAtt" and isinstance(value, str):
            value = value.split(".", 1)
        return {long_name: value}

    return construct


for _tag in (
    "Ref",
    "Condition",
    "Sub",
    "GetAtt",
    "If",
    "Equals",
    "Not",
    "And",
    "Or",
    "Join",
    "Select",
    "Split",
    "FindInMap",
    "ImportValue",
    "Base64",
    "Cidr",
    "GetAZs",
    "Transform",
    "Length",
    "ToJsonString",
):
    CloudFormationLoader.add_constructor(f"!{_tag}", _short_form_constructor(_tag))


def load_cloudformation_yaml(text: str) -> dict[str, Any]:
    document = yaml.load(text, Loader=CloudFormationLoader)  # noqa: S506  (a SafeLoader subclass)
    assert isinstance(document, dict)
    return document


# --- reading the template -------------------------------------------------------------


@cache
def template() -> dict[str, Any]:
    return load_cloudformation_yaml(TEMPLATE.read_text())


def resources() -> dict[str, Any]:
    return template()["Resources"]  # type: ignore[no-any-return]


def function_properties(logical_id: str) -> dict[str, Any]:
    resource = resources()[logical_id]
    assert resource["Type"] == "AWS::Serverless::Function", logical_id
    return resource["Properties"]  # type: ignore[no-any-return]


def global_function_settings() -> dict[str, Any]:
    return template().get("Globals", {}).get("Function", {})  # type: ignore[no-any-return]


def effective_environment(logical_id: str) -> dict[str, Any]:
    """Globals' variables overlaid by the function's own (SAM merges the two maps)."""
    merged = dict(global_function_settings().get("Environment", {}).get("Variables", {}))
    merged.update(function_properties(logical_id).get("Environment", {}).get("Variables", {}))
    return merged


def sub_text(value: Any) -> Any:
    """The template string of ``!Sub "..."`` (or a plain string as it is), for comparing ARNs."""
    if isinstance(value, dict) and set(value) == {"Fn::Sub"} and isinstance(value["Fn::Sub"], str):
        return value["Fn::Sub"]
    return value


def alternatives(value: Any) -> list[Any]:
    """Every value an ``!If`` may take (recursively); other values stand for themselves."""
    if isinstance(value, dict) and set(value) == {"Fn::If"}:
        _, when_true, when_false = value["Fn::If"]
        return alternatives(when_true) + alternatives(when_false)
    if value == {"Ref": "AWS::NoValue"}:
        return []
    return [value]


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def statement_resources(statement: dict[str, Any]) -> list[Any]:
    return [sub_text(choice) for item in as_list(statement["Resource"]) for choice in alternatives(item)]


def policy_statements(logical_id: str) -> Iterator[dict[str, Any]]:
    """Every IAM statement the function's Policies grant: its inline statements and the
    statements of customer managed policies defined in this template."""
    for policy in function_properties(logical_id).get("Policies", []):
        if isinstance(policy, dict) and set(policy) == {"Ref"}:
            referenced = resources()[policy["Ref"]]
            assert referenced["Type"] == "AWS::IAM::ManagedPolicy", policy
            yield from as_list(referenced["Properties"]["PolicyDocument"]["Statement"])
        elif isinstance(policy, dict) and set(policy) <= {"Statement", "Version"}:
            yield from as_list(policy["Statement"])
        else:
            # An AWS managed policy name or a SAM policy template: its statements are not
            # in this file, so nothing here could prove it least-privilege.
            pytest.fail(f"{logical_id}: policy {policy!r} is not an explicit statement list")


def allowed_actions(statement: dict[str, Any]) -> list[str]:
    return [str(action) for action in as_list(statement["Action"])]


def api_routes() -> dict[tuple[str, str], tuple[str, str | None]]:
    routes: dict[tuple[str, str], tuple[str, str | None]] = {}
    for logical_id in FUNCTIONS:
        for event in function_properties(logical_id).get("Events", {}).values():
            if event["Type"] != "Api":
                continue
            properties = event["Properties"]
            key = (properties["Method"].upper(), properties["Path"])
            assert key not in routes, f"route {key} declared twice"
            routes[key] = (logical_id, properties.get("Auth", {}).get("Authorizer"))
    return routes


def schedule_events(logical_id: str) -> list[dict[str, Any]]:
    events = function_properties(logical_id).get("Events", {}).values()
    return [event["Properties"] for event in events if event["Type"] in ("Schedule", "ScheduleV2")]


# --- what counts as a write -----------------------------------------------------------

# Read-only means: the action's name starts with Get, List or Describe, or it is
# kms:Decrypt. Everything else (Put*, Create*, Encrypt, PassRole, "*", "svc:*", ...)
# counts as a write.
READ_ONLY_VERB = re.compile(r"(Get|List|Describe)[A-Za-z*]*")


def is_read_only(action: str) -> bool:
    if action.lower() == "kms:decrypt":
        return True
    service, _, verb = action.partition(":")
    return bool(service) and bool(verb) and READ_ONLY_VERB.fullmatch(verb) is not None


def grants(statement: dict[str, Any], action: str) -> bool:
    """Whether the statement's Action patterns (IAM wildcards, case-insensitive) cover ``action``."""
    for pattern in allowed_actions(statement):
        regex = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
        if re.fullmatch(regex, action, flags=re.IGNORECASE):
            return True
    return False


def test_read_only_rule_classifies_actions_as_documented() -> None:
    assert is_read_only("ssm:GetParameters")
    assert is_read_only("ssm:GetParameter")
    assert is_read_only("ec2:DescribeNetworkInterfaces")
    assert is_read_only("kms:Decrypt")
    assert is_read_only("ssm:Get*")
    for write in ("ssm:PutParameter", "kms:Encrypt", "kms:GenerateDataKey", "events:PutEvents", "ssm:*", "*"):
        assert not is_read_only(write), write


# --- functions and handlers -----------------------------------------------------------


def test_the_template_declares_exactly_the_six_functions() -> None:
    declared = {name for name, res in resources().items() if res["Type"] == "AWS::Serverless::Function"}
    assert declared == set(FUNCTIONS)


@pytest.mark.parametrize(("logical_id", "directory"), sorted(FUNCTIONS.items()))
def test_each_function_handler_file_exists_and_defines_lambda_handler(logical_id: str, directory: str) -> None:
    properties = function_properties(logical_id)
    assert properties["CodeUri"].rstrip("/") == f"functions/{directory}"
    assert properties["Handler"] == "app.lambda_handler"
    source = ROOT / "functions" / directory / "app.py"
    assert source.is_file(), f"{source} is missing"
    defined = {node.name for node in ast.parse(source.read_text()).body if isinstance(node, ast.FunctionDef)}
    assert "lambda_handler" in defined


def test_every_function_runs_python313_with_the_layer_and_active_tracing() -> None:
    settings = global_function_settings()
    assert settings["Runtime"] == "python3.13"
    assert settings["Tracing"] == "Active"
    assert settings["Layers"] == [
        {"Ref": "TokenManagerLayer"},
        {"Fn::If": ["UseDirectPostgres", {"Ref": "PostgresDriverLayer"}, {"Ref": "AWS::NoValue"}]},
    ]
    for logical_id in FUNCTIONS:
        properties = function_properties(logical_id)
        for overridden in ("Runtime", "Tracing", "Layers"):
            assert overridden not in properties, f"{logical_id} overrides {overridden}"
    assert resources()["SonosApi"]["Properties"]["TracingEnabled"] is True


def test_the_layer_is_built_with_python313_from_the_layer_package() -> None:
    layer = resources()["TokenManagerLayer"]
    assert layer["Type"] == "AWS::Serverless::LayerVersion"
    assert layer["Properties"]["ContentUri"].rstrip("/") == "layers/token_manager"
    assert layer["Metadata"]["BuildMethod"] == "python3.13"
    assert (ROOT / "layers" / "token_manager" / "requirements.txt").is_file()


def test_timeouts_fit_api_gateway_and_the_refresher_period() -> None:
    assert global_function_settings()["Timeout"] < 29, "API Gateway gives up on an integration after 29 s"
    period = int(effective_environment("TokenRefresherFunction")["REFRESHER_PERIOD_SECONDS"])
    assert function_properties("TokenRefresherFunction")["Timeout"] < period, "a run must end before the next"


# --- API routes and authorization -----------------------------------------------------


def test_routes_are_the_four_of_the_design_each_on_its_function() -> None:
    routes = api_routes()
    assert {key: function for key, (function, _) in routes.items()} == {
        key: function for key, (function, _) in ROUTES.items()
    }


def test_callback_route_is_public_and_every_other_route_requires_aws_iam() -> None:
    api_auth = resources()["SonosApi"]["Properties"]["Auth"]
    assert api_auth["DefaultAuthorizer"] == "AWS_IAM"
    for key, (_, authorizer) in api_routes().items():
        expected = ROUTES[key][1]
        # An explicit authorizer on every route: none silently depends on the default.
        assert authorizer == expected, f"{key} has authorizer {authorizer!r}, expected {expected!r}"
    public = [key for key, (_, authorizer) in api_routes().items() if authorizer == "NONE"]
    assert public == [("GET", "/sonos/oauth/callback")]


def test_iam_routes_invoke_through_resource_policies_not_caller_credentials() -> None:
    # SAM's default (CALLER_CREDENTIALS) would make every caller need lambda:InvokeFunction too.
    assert resources()["SonosApi"]["Properties"]["Auth"]["InvokeRole"] == "NONE"


def test_api_stage_is_throttled_and_never_logs_request_data() -> None:
    settings = resources()["SonosApi"]["Properties"]["MethodSettings"]
    by_route = {(s["ResourcePath"], s["HttpMethod"]): s for s in settings}
    stage_wide = by_route[("/*", "*")]
    assert 0 < stage_wide["ThrottlingRateLimit"] <= stage_wide["ThrottlingBurstLimit"]
    callback = by_route[("/~1sonos~1oauth~1callback", "GET")]
    assert callback["ThrottlingRateLimit"] <= stage_wide["ThrottlingRateLimit"]
    for setting in settings:
        # Full request logging would write the authorization code and access tokens to CloudWatch.
        assert setting.get("DataTraceEnabled") is False, setting


# --- schedules ------------------------------------------------------------------------


@pytest.mark.parametrize(("logical_id", "expression"), sorted(SCHEDULES.items()))
def test_scheduled_functions_run_at_their_rate(logical_id: str, expression: str) -> None:
    events = function_properties(logical_id)["Events"].values()
    assert [(e["Type"], e["Properties"]["ScheduleExpression"]) for e in events] == [("ScheduleV2", expression)]


def test_only_the_refresher_and_rotation_are_scheduled() -> None:
    scheduled = {logical_id for logical_id in FUNCTIONS if schedule_events(logical_id)}
    assert scheduled == set(SCHEDULES)


def test_refresher_period_setting_matches_its_schedule() -> None:
    match = re.fullmatch(r"rate\((\d+) minutes?\)", SCHEDULES["TokenRefresherFunction"])
    assert match is not None
    declared = effective_environment("TokenRefresherFunction")["REFRESHER_PERIOD_SECONDS"]
    assert int(declared) == int(match.group(1)) * 60


@pytest.mark.parametrize("logical_id", sorted(SCHEDULES))
def test_schedule_input_has_the_shape_of_the_sample_schedule_event(logical_id: str) -> None:
    (schedule,) = schedule_events(logical_id)
    payload = json.loads(schedule["Input"])
    sample = json.loads((EVENTS / f"{FUNCTIONS[logical_id]}_schedule.json").read_text())
    assert set(payload) == set(sample)
    assert payload["source"] == sample["source"] == "aws.scheduler"


# --- IAM ------------------------------------------------------------------------------


@pytest.mark.parametrize("logical_id", sorted(FUNCTIONS))
def test_no_statement_allows_a_write_action_on_every_resource(logical_id: str) -> None:
    for statement in policy_statements(logical_id):
        assert statement["Effect"] == "Allow"
        # NotAction / NotResource grant everything but a list: never least privilege here.
        assert not {"NotAction", "NotResource"} & set(statement), statement
        writes = [action for action in allowed_actions(statement) if not is_read_only(action)]
        if writes:
            assert "*" not in statement_resources(statement), f"{logical_id}: {writes} on Resource '*'"


@pytest.mark.parametrize("logical_id", sorted(FUNCTIONS))
def test_no_statement_allows_any_action_on_every_resource_or_every_action(logical_id: str) -> None:
    # Stricter than the write rule: nothing in this service needs Resource "*" at all.
    for statement in policy_statements(logical_id):
        assert "*" not in statement_resources(statement), statement
        assert not any(action == "*" or action.endswith(":*") for action in allowed_actions(statement)), statement


def test_only_key_rotation_may_put_a_parameter_and_only_the_key_ring() -> None:
    writers = {
        logical_id: [s for s in policy_statements(logical_id) if grants(s, "ssm:PutParameter")]
        for logical_id in FUNCTIONS
    }
    assert {logical_id for logical_id, found in writers.items() if found} == {"KeyRotationFunction"}
    for statement in writers["KeyRotationFunction"]:
        assert statement_resources(statement) == [KEY_RING_PARAMETER_ARN]
        assert allowed_actions(statement) == ["ssm:PutParameter"]


@pytest.mark.parametrize("logical_id", sorted(FUNCTIONS))
def test_ssm_access_stays_under_the_service_parameter_path(logical_id: str) -> None:
    readers = [s for s in policy_statements(logical_id) if grants(s, "ssm:GetParameters")]
    assert readers, f"{logical_id} cannot read its settings"
    assert any(grants(s, "ssm:GetParameter") for s in readers)
    for statement in policy_statements(logical_id):
        if any(action.lower().startswith("ssm:") for action in allowed_actions(statement)):
            for resource in statement_resources(statement):
                assert str(resource).startswith(PARAMETER_ARN_PREFIX), resource


@pytest.mark.parametrize("logical_id", sorted(FUNCTIONS))
def test_kms_is_usable_only_through_ssm_and_encrypt_only_by_key_rotation(logical_id: str) -> None:
    kms_statements = [
        s for s in policy_statements(logical_id) if any(a.lower().startswith("kms:") for a in allowed_actions(s))
    ]
    assert any(grants(s, "kms:Decrypt") for s in kms_statements), f"{logical_id} cannot decrypt SecureStrings"
    for statement in kms_statements:
        via = statement["Condition"]["StringEquals"]["kms:ViaService"]
        assert sub_text(via) == SSM_VIA_SERVICE
    encrypts = any(grants(s, "kms:Encrypt") for s in kms_statements)
    assert encrypts is (logical_id == "KeyRotationFunction")


def test_key_rotation_encrypts_only_for_the_key_ring_parameter() -> None:
    (statement,) = [s for s in policy_statements("KeyRotationFunction") if grants(s, "kms:Encrypt")]
    context = statement["Condition"]["StringEquals"]["kms:EncryptionContext:PARAMETER_ARN"]
    assert sub_text(context) == KEY_RING_PARAMETER_ARN


def test_only_fetch_and_refresher_put_events_and_only_on_the_configured_bus() -> None:
    from token_manager.notifications import EVENT_SOURCE

    emitters = {
        logical_id
        for logical_id in FUNCTIONS
        if any(grants(s, "events:PutEvents") for s in policy_statements(logical_id))
    }
    assert emitters == EVENT_EMITTERS
    for logical_id in EVENT_EMITTERS:
        for statement in policy_statements(logical_id):
            if grants(statement, "events:PutEvents"):
                assert statement_resources(statement) == [EVENT_BUS_ARN]
                assert statement["Condition"]["StringEquals"]["events:source"] == EVENT_SOURCE


# --- VPC ------------------------------------------------------------------------------


def test_vpc_placement_is_per_function_and_conditional() -> None:
    assert "VpcConfig" not in global_function_settings(), "Globals would put key rotation in the VPC too"
    for logical_id in REDIS_FUNCTIONS:
        vpc = function_properties(logical_id)["VpcConfig"]
        condition, in_vpc, outside = vpc["Fn::If"]
        assert condition == "UseVpc"
        assert in_vpc == {"SubnetIds": {"Ref": "VpcSubnetIds"}, "SecurityGroupIds": {"Ref": "VpcSecurityGroupIds"}}
        assert outside == {"Ref": "AWS::NoValue"}


def test_key_rotation_is_not_in_the_vpc() -> None:
    assert "VpcConfig" not in function_properties("KeyRotationFunction")


def test_vpc_parameters_default_to_no_vpc() -> None:
    parameters = template()["Parameters"]
    for name in ("VpcSubnetIds", "VpcSecurityGroupIds"):
        assert parameters[name]["Type"] == "CommaDelimitedList"
        assert parameters[name]["Default"] == ""
    referenced = json.dumps(template()["Conditions"]["UseVpc"])
    assert "VpcSubnetIds" in referenced
    assert "VpcSecurityGroupIds" in referenced


# --- environment ----------------------------------------------------------------------


def test_every_setting_is_declared_as_a_global_environment_variable() -> None:
    declared = set(global_function_settings()["Environment"]["Variables"])
    assert declared >= SETTINGS_ENV_VARS, sorted(SETTINGS_ENV_VARS - declared)


def test_secrets_default_to_empty_so_they_come_from_ssm() -> None:
    variables = global_function_settings()["Environment"]["Variables"]
    for name in SECRET_OR_SSM_ENV_VARS:
        assert variables[name] == "", name
    redis = template()["Parameters"][variables["REDIS_URL"]["Ref"]]
    assert redis["Default"] == ""
    assert redis["NoEcho"] is True
    assert "rediss://" in redis["Description"]
    database = template()["Parameters"][variables["DATABASE_URL"]["Ref"]]
    assert (database["Default"], database["NoEcho"]) == ("", True)


def test_the_postgres_driver_ships_only_with_a_direct_database_url() -> None:
    # psycopg is 10.8 MB: Supabase deployments (the default) do not carry it.
    layer = resources()["PostgresDriverLayer"]
    assert layer["Condition"] == "UseDirectPostgres"
    assert layer["Properties"]["ContentUri"] == "layers/postgres_driver/"
    assert template()["Conditions"]["UseDirectPostgres"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "DatabaseUrl"}, ""]}]}
    lines = (ROOT / "layers" / "token_manager" / "requirements.txt").read_text().splitlines()
    packages = {line.split("==")[0].split("[")[0].strip() for line in lines if line.strip() and line[0] != "#"}
    assert "postgrest" in packages
    assert not packages & {"psycopg", "psycopg-binary", "supabase"}


def test_operational_settings_have_their_documented_defaults() -> None:
    variables = global_function_settings()["Environment"]["Variables"]
    assert variables["SSM_PARAMETER_MAX_AGE_SECONDS"] == "300"
    assert variables["REFRESHER_CONCURRENCY"] == "16"
    assert variables["REFRESHER_PERIOD_SECONDS"] == "300"
    assert variables["REFRESH_AHEAD_SECONDS"] == "300"
    assert variables["SONOS_SCOPE"] == "playback-control-all"
    assert variables["SONOS_AUTH_BASE_URL"] == "https://api.sonos.com"
    assert variables["SONOS_CONTROL_BASE_URL"] == "https://api.ws.sonos.com/control/api/v1"
    assert variables["ENV"] == {"Ref": "Env"}
    assert variables["EVENT_BUS_NAME"] == {"Ref": "EventBusName"}
    # Neither the event (the callback's code) nor responses (access tokens) reach logs or traces.
    assert variables["POWERTOOLS_LOGGER_LOG_EVENT"] == "false"
    assert variables["POWERTOOLS_TRACER_CAPTURE_RESPONSE"] == "false"


def test_every_environment_value_is_a_string_or_a_reference() -> None:
    for logical_id in FUNCTIONS:
        for name, value in effective_environment(logical_id).items():
            assert isinstance(value, str) or (isinstance(value, dict) and set(value) == {"Ref"}), (name, value)


@cache
def env_json() -> dict[str, dict[str, str]]:
    document = json.loads(ENV_JSON.read_text())
    assert isinstance(document, dict)
    return document


def test_env_json_has_a_block_for_each_function_and_nothing_else() -> None:
    assert set(env_json()) == set(FUNCTIONS)


@pytest.mark.parametrize("logical_id", sorted(FUNCTIONS))
def test_env_json_names_exactly_the_variables_the_template_declares(logical_id: str) -> None:
    local = env_json()[logical_id]
    declared = set(effective_environment(logical_id))
    assert set(local) - declared == set(), "sam local would drop these: declare them in the template"
    assert declared - set(local) == set(), "env.json must set every declared variable"
    assert all(isinstance(value, str) for value in local.values())


@pytest.mark.parametrize("logical_id", sorted(FUNCTIONS))
def test_env_json_is_a_complete_local_configuration_needing_no_ssm(logical_id: str) -> None:
    from token_manager.settings import load_settings

    def no_ssm(names: list[str], max_age: int) -> dict[str, str]:
        raise AssertionError(f"env.json leaves {names} to SSM")

    settings = load_settings(env_json()[logical_id], fetch_ssm=no_ssm)
    assert settings.env == "dev"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.auth_base_url.startswith("http://127.0.0.1:8710")
    assert settings.control_base_url.startswith("http://127.0.0.1:8710")
    assert settings.database_url is not None
    assert "127.0.0.1" in settings.database_url


def test_env_json_key_ring_is_real_shaped_and_labelled_local_only() -> None:
    from token_manager.crypto import KEY_BYTES, KeyRing

    rings = {block["TOKEN_ENCRYPTION_KEYS"] for block in env_json().values()}
    assert len(rings) == 1, "every function must share one local key ring"
    ring = KeyRing.from_json(rings.pop())
    assert ring.active_key_id == "local-dev-only"
    assert list(ring.keys) == ["local-dev-only"]
    assert len(ring.keys["local-dev-only"]) == KEY_BYTES


# --- sample events --------------------------------------------------------------------


def sample_events() -> list[Path]:
    return sorted(path for path in EVENTS.glob("*.json") if path != ENV_JSON)


def event_kind(path: Path) -> tuple[str, str]:
    """(function logical id, kind) from a name like token_fetch_household_direct.json."""
    for directory, logical_id in DIRECTORY_TO_FUNCTION.items():
        if path.stem.startswith(directory + "_"):
            kind = path.stem.rsplit("_", 1)[1]
            return logical_id, kind
    pytest.fail(f"{path.name} does not name a function (functions/<name>_..._<direct|api|schedule>.json)")


@pytest.mark.parametrize("path", sample_events(), ids=lambda p: p.name)
def test_each_sample_event_parses_and_names_a_function_and_trigger(path: Path) -> None:
    event = json.loads(path.read_text())
    assert isinstance(event, dict)
    _, kind = event_kind(path)
    assert kind in ("direct", "api", "schedule"), path.name


@pytest.mark.parametrize("path", [p for p in sample_events() if p.stem.endswith("_api")], ids=lambda p: p.name)
def test_api_events_hit_their_functions_route_with_a_realistic_request_context(path: Path) -> None:
    logical_id, _ = event_kind(path)
    event = json.loads(path.read_text())
    route = (event["httpMethod"], event["resource"])
    assert ROUTES[route][0] == logical_id, f"{path.name} is {route}, not a route of {logical_id}"
    context = event["requestContext"]
    assert context["resourcePath"] == event["resource"] == event["path"]
    assert context["httpMethod"] == event["httpMethod"]
    assert context["stage"]
    assert context["requestId"]
    assert context["apiId"]
    assert context["path"] == f"/{context['stage']}{event['path']}"
    signed = context["identity"]["userArn"] is not None
    assert signed is (ROUTES[route][1] == "AWS_IAM"), "IAM routes carry the caller's identity; the callback none"
    if event["queryStringParameters"]:
        assert event["multiValueQueryStringParameters"] == {k: [v] for k, v in event["queryStringParameters"].items()}
    if event["body"] is not None:
        assert isinstance(json.loads(event["body"]), dict)


def test_every_route_has_an_api_event_and_the_callback_has_a_denied_one() -> None:
    covered = set()
    for path in sample_events():
        if path.stem.endswith("_api"):
            event = json.loads(path.read_text())
            covered.add((event["httpMethod"], event["resource"]))
    assert covered == set(ROUTES)
    denied = json.loads((EVENTS / "oauth_callback_denied_api.json").read_text())
    assert denied["queryStringParameters"]["error"] == "access_denied"
    assert denied["queryStringParameters"]["state"]
    assert "code" not in denied["queryStringParameters"]
    success = json.loads((EVENTS / "oauth_callback_api.json").read_text())
    assert {"code", "state"} <= set(success["queryStringParameters"])


def test_every_function_has_a_sample_event_for_each_of_its_triggers() -> None:
    kinds: dict[str, set[str]] = {logical_id: set() for logical_id in FUNCTIONS}
    for path in sample_events():
        logical_id, kind = event_kind(path)
        kinds[logical_id].add(kind)
    direct = {"OAuthInitiateFunction", "TokenFetchFunction", "TokenRevokeFunction", "KeyRotationFunction"}
    for logical_id in FUNCTIONS:
        expected = set()
        if logical_id in direct:
            expected.add("direct")
        if any(function == logical_id for function, _ in ROUTES.values()):
            expected.add("api")
        if logical_id in SCHEDULES:
            expected.add("schedule")
        assert kinds[logical_id] == expected, logical_id


@pytest.mark.parametrize("path", [p for p in sample_events() if p.stem.endswith("_direct")], ids=lambda p: p.name)
def test_direct_events_carry_the_documented_payload(path: Path) -> None:
    logical_id, _ = event_kind(path)
    event = json.loads(path.read_text())
    allowed = {
        "OAuthInitiateFunction": ({"userId"}, {"userId", "redirectUri"}),
        "TokenFetchFunction": ({"userId"}, {"userId", "householdId", "correlationId"}),
        "TokenRevokeFunction": ({"userId"}, {"userId", "householdId"}),
        "KeyRotationFunction": (set(), set()),
    }
    required, permitted = allowed[logical_id]
    assert required <= set(event) <= permitted, path.name


def test_files_that_mention_sample_events_name_ones_that_exist() -> None:
    mention = re.compile(r"events/([A-Za-z0-9_.-]+\.json)")
    candidates = [ROOT / "Makefile", ROOT / "README.md", ROOT / "samconfig.toml", TEMPLATE]
    candidates += [p for d in ("docs", "scripts", ".ci") for p in (ROOT / d).rglob("*") if p.is_file()]
    missing = [
        f"{path.relative_to(ROOT)}: events/{name}"
        for path in candidates
        if path.is_file()
        for name in mention.findall(path.read_text(errors="replace"))
        if not (EVENTS / name).is_file()
    ]
    assert missing == []


# --- outputs and lint -----------------------------------------------------------------


def test_outputs_give_the_api_url_every_function_arn_and_the_layer_arn() -> None:
    outputs = template()["Outputs"]
    assert "execute-api" in sub_text(outputs["ApiUrl"]["Value"])
    for logical_id in FUNCTIONS:
        assert outputs[f"{logical_id}Arn"]["Value"] == {"Fn::GetAtt": [logical_id, "Arn"]}
    assert outputs["TokenManagerLayerArn"]["Value"] == {"Ref": "TokenManagerLayer"}


def test_cfn_lint_finds_no_errors_or_warnings() -> None:
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    result = subprocess.run(
        [str(cfn_lint), str(TEMPLATE)], capture_output=True, text=True, cwd=ROOT, check=False, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
