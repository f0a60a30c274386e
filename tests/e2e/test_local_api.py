"""The local API server: routes from a template, API Gateway v1 proxy events in, proxy responses out."""

from __future__ import annotations

import base64
import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from devtools.local_api import (
    LocalApi,
    ServiceDefinition,
    load_template,
)

SECRET_CODE = "code-MARKER-9c1e44d0b7"
CRASH_MESSAGE = "crash-MARKER-77aa01f3"

TEMPLATE = """\
AWSTemplateFormatVersion: "2010-09-09"
Transform: AWS::Serverless-2016-10-31
Parameters:
  Env:
    Type: String
    Default: qa
Conditions:
  Never: !Equals [!Ref Env, never]
Globals:
  Function:
    Runtime: python3.13
    Handler: app.lambda_handler
    Timeout: 7
    Environment:
      Variables:
        LOCAL_API_TEST_FROM_TEMPLATE: from-template
        LOCAL_API_TEST_INTRINSIC: !Ref Env
Resources:
  Layer:
    Type: AWS::Serverless::LayerVersion
    Properties:
      ContentUri: layer/
  Api:
    Type: AWS::Serverless::Api
    Properties:
      StageName: !Ref Env
      Auth:
        DefaultAuthorizer: AWS_IAM
  EchoFunction:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: functions/echo/
      Description: !Sub "echo ${Env}"
      VpcConfig: !If [Never, {SubnetIds: !Ref AWS::NoValue}, !Ref AWS::NoValue]
      Role: !GetAtt SomeRole.Arn
      Events:
        Initiate:
          Type: Api
          Properties:
            RestApiId: !Ref Api
            Path: /sonos/oauth/initiate
            Method: post
        Items:
          Type: Api
          Properties:
            RestApiId: !Ref Api
            Path: /items/{itemId}/{rest+}
            Method: any
        Public:
          Type: Api
          Properties:
            RestApiId: !Ref Api
            Path: /public
            Method: get
            Auth:
              Authorizer: NONE
        Fetch:
          Type: Api
          Properties:
            RestApiId: !Ref Api
            Path: /sonos/token
            Method: get
  OtherFunction:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: functions/other/
      Timeout: 11
      Events:
        Other:
          Type: Api
          Properties:
            RestApiId: !Ref Api
            Path: /other
            Method: get
            Auth:
              Authorizer: NONE
        Nightly:
          Type: ScheduleV2
          Properties:
            ScheduleExpression: rate(1 day)
"""

# Echoes what it was given, and answers in every shape the tests need, chosen by the path.
ECHO_HANDLER = f'''
import base64, json
from local_api_test_layer import LAYER_MARKER

def lambda_handler(event, context):
    path = event["path"]
    if path == "/sonos/oauth/initiate":
        user = json.loads(event["body"])["userId"]
        url = "http://consent.test/authorize?state=s1&user=" + user
        return {{"statusCode": 200, "headers": {{"Content-Type": "application/json"}},
                "body": json.dumps({{"authorizationUrl": url, "state": "s1", "expiresIn": 600}})}}
    if path == "/sonos/token":
        return {{"statusCode": 404, "headers": {{"Content-Type": "application/json"}},
                "body": json.dumps({{"error": {{"code": "not_connected", "message": "No."}}}})}}
    if path == "/items/crash/x":
        raise RuntimeError("{CRASH_MESSAGE}")
    if path == "/items/direct/x":
        return {{"error": {{"code": "configuration_error", "message": "not wired", "status": 500}}}}
    if path == "/items/binary/x":
        return {{"statusCode": 201, "isBase64Encoded": True, "body": base64.b64encode(b"\\xff\\x00\\xfe").decode(),
                "headers": {{"Content-Type": "application/octet-stream", "X-One": "1"}},
                "multiValueHeaders": {{"Set-Cookie": ["a=1", "b=2"]}}}}
    context_seen = {{
        "function_name": context.function_name,
        "aws_request_id": context.aws_request_id,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "memory": context.memory_limit_in_mb,
        "arn": context.invoked_function_arn,
    }}
    return {{"statusCode": 200, "headers": {{"Content-Type": "application/json"}},
            "body": json.dumps({{"event": event, "context": context_seen, "layer": LAYER_MARKER}})}}
'''

OTHER_HANDLER = """
def lambda_handler(event, context):
    return {"statusCode": 200, "body": "other:" + context.function_name}
"""


@pytest.fixture
def template_path(tmp_path: Path) -> Path:
    (tmp_path / "template.yaml").write_text(TEMPLATE)
    for name, source in (("echo", ECHO_HANDLER), ("other", OTHER_HANDLER)):
        (tmp_path / "functions" / name).mkdir(parents=True)
        (tmp_path / "functions" / name / "app.py").write_text(textwrap.dedent(source))
    (tmp_path / "layer").mkdir()
    (tmp_path / "layer" / "local_api_test_layer.py").write_text('LAYER_MARKER = "layer-on-path"\n')
    return tmp_path / "template.yaml"


@pytest.fixture
def log_lines() -> list[str]:
    return []


@pytest.fixture
def api(template_path: Path, log_lines: list[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalApi]:
    for name in ("LOCAL_API_TEST_FROM_TEMPLATE", "LOCAL_API_TEST_INTRINSIC"):
        monkeypatch.setenv(name, "")  # recorded, so the value the server sets is removed afterwards
        monkeypatch.delenv(name)
    monkeypatch.syspath_prepend(str(template_path.parent / "layer"))  # removed again after the test
    local = LocalApi(template_path, port=0, log=log_lines.append)
    with local:
        yield local


def _echo(response: requests.Response) -> Any:
    assert response.status_code == 200, response.text
    return json.loads(response.text)


def test_template_routes_carry_method_path_function_and_auth(template_path: Path) -> None:
    service = ServiceDefinition.from_template(template_path)

    routes = {(route.method, route.path): (route.function.logical_id, route.authorizer) for route in service.routes}

    assert routes == {
        ("POST", "/sonos/oauth/initiate"): ("EchoFunction", "AWS_IAM"),  # the API's DefaultAuthorizer
        ("ANY", "/items/{itemId}/{rest+}"): ("EchoFunction", "AWS_IAM"),
        ("GET", "/public"): ("EchoFunction", "NONE"),
        ("GET", "/sonos/token"): ("EchoFunction", "AWS_IAM"),
        ("GET", "/other"): ("OtherFunction", "NONE"),
    }
    assert service.default_stage == "qa"
    assert service.functions["EchoFunction"].timeout_seconds == 7  # from Globals
    assert service.functions["OtherFunction"].timeout_seconds == 11
    assert service.functions["EchoFunction"].module_path == template_path.parent / "functions/echo/app.py"
    assert service.layer_paths == (template_path.parent / "layer",)


def test_loader_reads_cloudformation_short_tags_as_long_forms(template_path: Path) -> None:
    resources = load_template(template_path)["Resources"]

    echo = resources["EchoFunction"]["Properties"]
    assert echo["Description"] == {"Fn::Sub": "echo ${Env}"}
    assert echo["Role"] == {"Fn::GetAtt": ["SomeRole", "Arn"]}
    assert echo["VpcConfig"] == {"Fn::If": ["Never", {"SubnetIds": {"Ref": "AWS::NoValue"}}, {"Ref": "AWS::NoValue"}]}


def test_the_real_template_serves_the_four_designed_routes() -> None:
    service = ServiceDefinition.from_template()

    routes = {(route.method, route.path): (route.function.logical_id, route.authorizer) for route in service.routes}

    assert routes == {
        ("POST", "/sonos/oauth/initiate"): ("OAuthInitiateFunction", "AWS_IAM"),
        ("GET", "/sonos/oauth/callback"): ("OAuthCallbackFunction", "NONE"),
        ("GET", "/sonos/token"): ("TokenFetchFunction", "AWS_IAM"),
        ("DELETE", "/sonos/token"): ("TokenRevokeFunction", "AWS_IAM"),
    }
    assert {"TokenRefresherFunction", "KeyRotationFunction"} <= set(service.functions)


def test_request_becomes_a_rest_v1_proxy_event(api: LocalApi) -> None:
    response = requests.post(
        api.url + "/items/42/a/b?tag=x&tag=y&single=1&blank=",
        data=json.dumps({"userId": "u-1"}),
        headers={"Content-Type": "application/json", "X-Repeat": "one"},
        timeout=10,
    )

    event = _echo(response)["event"]
    assert isinstance(event, dict)
    assert event["httpMethod"] == "POST"
    assert event["path"] == "/items/42/a/b"
    assert event["resource"] == "/items/{itemId}/{rest+}"
    assert event["pathParameters"] == {"itemId": "42", "rest": "a/b"}
    assert event["queryStringParameters"] == {"tag": "y", "single": "1", "blank": ""}
    assert event["multiValueQueryStringParameters"] == {"tag": ["x", "y"], "single": ["1"], "blank": [""]}
    assert event["headers"]["Content-Type"] == "application/json"
    assert event["multiValueHeaders"]["X-Repeat"] == ["one"]
    assert json.loads(event["body"]) == {"userId": "u-1"}
    assert event["isBase64Encoded"] is False
    context = event["requestContext"]
    assert context["stage"] == "qa"
    assert context["resourcePath"] == "/items/{itemId}/{rest+}"
    assert context["path"] == "/qa/items/42/a/b"
    assert context["httpMethod"] == "POST"
    assert context["identity"]["sourceIp"] == "127.0.0.1"


def test_repeated_request_headers_keep_every_value_and_the_last_in_headers(api: LocalApi) -> None:
    import http.client

    host, port = api.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("GET", "/items/1/x")
    connection.putheader("X-Multi", "first")
    connection.putheader("X-Multi", "second")
    connection.endheaders()
    payload = json.loads(connection.getresponse().read())
    connection.close()

    assert payload["event"]["multiValueHeaders"]["X-Multi"] == ["first", "second"]
    assert payload["event"]["headers"]["X-Multi"] == "second"


def test_non_utf8_body_is_base64_encoded(api: LocalApi) -> None:
    raw = b"\xff\xfe\x00binary"

    event = _echo(requests.put(api.url + "/items/1/x", data=raw, timeout=10))["event"]

    assert isinstance(event, dict)
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == raw


def test_every_request_gets_a_fresh_request_id_and_a_lambda_context(api: LocalApi) -> None:
    first = _echo(requests.get(api.url + "/items/1/x", timeout=10))
    second = _echo(requests.get(api.url + "/items/1/x", timeout=10))

    ids = {first["event"]["requestContext"]["requestId"], second["event"]["requestContext"]["requestId"]}
    assert len(ids) == 2
    context = first["context"]
    assert isinstance(context, dict)
    assert context["function_name"] == "EchoFunction"
    assert context["aws_request_id"] == first["event"]["requestContext"]["requestId"]
    assert 0 < context["remaining_ms"] <= 7000
    assert context["arn"].endswith(":function:EchoFunction")
    assert first["layer"] == "layer-on-path"  # the template's layer is importable, as in /opt/python


def test_iam_route_gets_a_local_caller_identity_and_a_log_line(api: LocalApi, log_lines: list[str]) -> None:
    iam_event = _echo(requests.get(api.url + "/items/1/x", timeout=10))["event"]
    public_event = _echo(requests.get(api.url + "/public", timeout=10))["event"]

    iam_identity = iam_event["requestContext"]["identity"]
    assert iam_identity["userArn"].startswith("arn:aws:sts::")
    assert iam_identity["caller"]
    assert iam_identity["accessKey"]
    public_identity = public_event["requestContext"]["identity"]
    assert public_identity["userArn"] is None
    assert public_identity["caller"] is None
    assert any("/items/1/x" in line and "AWS_IAM" in line and "local caller" in line for line in log_lines)
    assert any("/public" in line and "auth NONE" in line for line in log_lines)


def test_proxy_response_is_written_back_with_multi_value_headers_and_base64_body(api: LocalApi) -> None:
    response = requests.get(api.url + "/items/binary/x", timeout=10)

    assert response.status_code == 201
    assert response.content == b"\xff\x00\xfe"
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["X-One"] == "1"
    assert response.raw.headers.getlist("Set-Cookie") == ["a=1", "b=2"]


def test_unknown_route_answers_404_in_the_service_error_shape(api: LocalApi) -> None:
    response = requests.get(api.url + "/nowhere", timeout=10)

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert "/nowhere" in response.json()["error"]["message"]
    # Written as the handlers write theirs: compact JSON, never cached, a clean Server header.
    assert response.content.startswith(b'{"error":{"code":"not_found"')
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Server"] == "LocalApiGateway/1"


def test_known_path_with_another_method_answers_405_with_allow(api: LocalApi) -> None:
    response = requests.delete(api.url + "/public", timeout=10)

    assert response.status_code == 405
    assert response.headers["Allow"] == "GET"
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_crashing_handler_is_a_502_and_its_message_stays_out_of_the_log(api: LocalApi, log_lines: list[str]) -> None:
    response = requests.get(api.url + "/items/crash/x", timeout=10)

    assert response.status_code == 502
    assert response.json() == {"message": "Internal server error"}
    assert any("RuntimeError" in line for line in log_lines)
    assert not any(CRASH_MESSAGE in line for line in log_lines)
    assert CRASH_MESSAGE not in response.text


def test_non_proxy_answer_is_a_502_like_api_gateway(api: LocalApi) -> None:
    response = requests.get(api.url + "/items/direct/x", timeout=10)

    assert response.status_code == 502


def test_log_lines_never_carry_the_query_string(api: LocalApi, log_lines: list[str]) -> None:
    requests.get(api.url + f"/public?code={SECRET_CODE}&state=s", timeout=10)
    requests.get(api.url + f"/nowhere?code={SECRET_CODE}", timeout=10)

    assert log_lines
    assert not any(SECRET_CODE in line for line in log_lines)


def test_each_function_loads_its_own_app_module(api: LocalApi) -> None:
    response = requests.get(api.url + "/other", timeout=10)

    assert response.status_code == 200
    assert response.text == "other:OtherFunction"
    assert _echo(requests.get(api.url + "/public", timeout=10))["context"]["function_name"] == "EchoFunction"


def test_template_literal_environment_is_applied_and_intrinsics_are_not(api: LocalApi) -> None:
    assert os.environ["LOCAL_API_TEST_FROM_TEMPLATE"] == "from-template"
    assert "LOCAL_API_TEST_INTRINSIC" not in os.environ


def test_stop_removes_the_template_environment_it_set(template_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(template_path.parent / "layer"))
    monkeypatch.setenv("LOCAL_API_TEST_FROM_TEMPLATE", "")
    monkeypatch.delenv("LOCAL_API_TEST_FROM_TEMPLATE")

    with LocalApi(template_path, port=0, log=lambda line: None):
        during = os.environ.get("LOCAL_API_TEST_FROM_TEMPLATE")

    assert during == "from-template"
    assert "LOCAL_API_TEST_FROM_TEMPLATE" not in os.environ


def test_direct_invoke_runs_any_function_with_its_own_context(api: LocalApi) -> None:
    answer = api.runner.invoke("OtherFunction", {"source": "aws.scheduler"})

    assert answer == {"statusCode": 200, "body": "other:OtherFunction"}


def test_start_page_lists_routes_and_connect_redirects_to_the_authorization_url(api: LocalApi) -> None:
    page = requests.get(api.url + "/", timeout=10)
    connect = requests.post(api.url + "/__local/connect", data={"userId": "demo-7"}, allow_redirects=False, timeout=10)

    assert page.status_code == 200
    assert 'id="connect"' in page.text
    assert "/sonos/oauth/initiate" in page.text
    assert "Not connected" in page.text  # the fetch route answered not_connected
    assert connect.status_code == 303
    assert connect.headers["Location"] == "http://consent.test/authorize?state=s1&user=demo-7"


def test_start_page_can_be_turned_off(template_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(template_path.parent / "layer"))
    with LocalApi(template_path, port=0, start_page=False, log=lambda line: None) as local:
        response = requests.get(local.url + "/", timeout=10)

    assert response.status_code == 404
