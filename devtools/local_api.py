"""A local API Gateway (REST, v1 proxy) that serves the routes of template.yaml with the real handlers in-process."""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import importlib.util
import json
import os
import re
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Self, cast
from urllib.parse import parse_qs, urlencode, urlsplit

# PyYAML comes with cfn-lint in the dev venv; its stubs (types-PyYAML) may not be installed.
import yaml  # type: ignore[import-untyped,unused-ignore]

from devtools.http_serving import KeepAliveHandler, QuietThreadingServer, Running, serve_in_thread, shut_down

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
DEFAULT_TEMPLATE: Final = REPO_ROOT / "template.yaml"
DEFAULT_PORT: Final = 3000
DEFAULT_STAGE: Final = "dev"
DEFAULT_TIMEOUT_SECONDS: Final = 3  # Lambda's own default when neither the function nor Globals sets one
DEFAULT_MEMORY_MB: Final = 128
LOCAL_ACCOUNT_ID: Final = "123456789012"
LOCAL_REGION: Final = "us-east-1"
LOCAL_API_ID: Final = "localapi"
LOCAL_CALLER: Final = "AROALOCALDEVELOPER0000:local-developer"
LOCAL_CALLER_ARN: Final = f"arn:aws:sts::{LOCAL_ACCOUNT_ID}:assumed-role/local-developer/local-developer"
MAX_BODY_BYTES: Final = 6 * 1024 * 1024  # API Gateway's payload limit for a Lambda proxy integration
SHUTDOWN_POLL_INTERVAL_SEC: Final = 0.05
DEMO_USER_ID: Final = "demo-user"
INITIATE_PATH: Final = "/sonos/oauth/initiate"
FETCH_PATH: Final = "/sonos/token"

# The local-only pages (start page, connect/disconnect buttons); never part of the template.
START_PAGE_PATH: Final = "/"
CONNECT_PATH: Final = "/__local/connect"
DISCONNECT_PATH: Final = "/__local/disconnect"
ROUTES_PATH: Final = "/__local/routes"

# API Gateway answers a Lambda that crashed or returned a malformed proxy response like this.
_BAD_GATEWAY_BODY: Final = b'{"message": "Internal server error"}'

Handler = Callable[[dict[str, Any], Any], Any]


# ---------------------------------------------------------------------------- the template


class _CloudFormationLoader(yaml.SafeLoader):  # type: ignore[misc,unused-ignore]
    """A SafeLoader that reads CloudFormation short tags (!Ref, !Sub, !If, ...) as their long forms."""


def _cloudformation_tag(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(cast(yaml.MappingNode, node), deep=True)
    if tag_suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)  # `!GetAtt A.B` is `Fn::GetAtt: [A, B]`
    name = tag_suffix if tag_suffix in ("Ref", "Condition") else f"Fn::{tag_suffix}"
    return {name: value}


_CloudFormationLoader.add_multi_constructor("!", _cloudformation_tag)


def load_template(path: Path) -> dict[str, Any]:
    """The template as plain data; short-form intrinsic functions become their long forms."""
    with path.open(encoding="utf-8") as stream:
        document = yaml.load(stream, Loader=_CloudFormationLoader)  # noqa: S506 - a SafeLoader subclass
    if not isinstance(document, dict):
        raise ValueError(f"{path} is not a CloudFormation template (no top-level mapping)")
    return document


@dataclass(frozen=True)
class LambdaFunction:
    """One AWS::Serverless::Function, as far as running it in-process needs."""

    logical_id: str
    code_dir: Path
    handler: str  # "module.function", as in the template
    timeout_seconds: int
    memory_mb: int
    environment: Mapping[str, str]  # the literal (non-intrinsic) variables, Globals first

    @property
    def module_path(self) -> Path:
        module, _, _ = self.handler.rpartition(".")
        return self.code_dir / (module.replace(".", "/") + ".py")

    @property
    def function_name(self) -> str:
        return self.handler.rpartition(".")[2]


@dataclass(frozen=True)
class Route:
    """One `Type: Api` event: a method and path template served by a function."""

    method: str  # upper case; "ANY" matches every method
    path: str  # the resource path, e.g. /sonos/token or /items/{id}
    function: LambdaFunction
    authorizer: str  # AWS_IAM, NONE, or the name of a custom authorizer
    event_name: str
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pattern", _path_pattern(self.path))

    def match(self, path: str) -> dict[str, str] | None:
        """The path parameters when `path` fits this route's template, else None."""
        found = self._pattern.fullmatch(path)
        return None if found is None else dict(found.groupdict())

    @property
    def needs_iam(self) -> bool:
        return self.authorizer.upper() == "AWS_IAM"


def _path_pattern(template_path: str) -> re.Pattern[str]:
    parts: list[str] = []
    for segment in template_path.strip("/").split("/"):
        greedy = re.fullmatch(r"\{([A-Za-z0-9_]+)\+\}", segment)
        plain = re.fullmatch(r"\{([A-Za-z0-9_]+)\}", segment)
        if greedy:
            parts.append(f"(?P<{greedy.group(1)}>.+)")
        elif plain:
            parts.append(f"(?P<{plain.group(1)}>[^/]+)")
        else:
            parts.append(re.escape(segment))
    return re.compile("/" + "/".join(parts))


@dataclass(frozen=True)
class ServiceDefinition:
    """What the template says about running the service: functions, their API routes, layer paths."""

    functions: Mapping[str, LambdaFunction]
    routes: tuple[Route, ...]
    layer_paths: tuple[Path, ...]
    default_stage: str

    @classmethod
    def from_template(cls, template_path: Path = DEFAULT_TEMPLATE) -> ServiceDefinition:
        template = load_template(template_path)
        base_dir = template_path.resolve().parent
        resources: dict[str, Any] = template.get("Resources") or {}
        globals_function: dict[str, Any] = (template.get("Globals") or {}).get("Function") or {}
        functions: dict[str, LambdaFunction] = {}
        routes: list[Route] = []
        for logical_id, resource in resources.items():
            if not isinstance(resource, dict) or resource.get("Type") != "AWS::Serverless::Function":
                continue
            properties: dict[str, Any] = resource.get("Properties") or {}
            function = _function_from_resource(logical_id, properties, globals_function, base_dir)
            functions[logical_id] = function
            for event_name, event in (properties.get("Events") or {}).items():
                if isinstance(event, dict) and event.get("Type") == "Api":
                    routes.append(_route_from_event(event_name, event, function, resources))
        layer_paths = tuple(
            path
            for resource in resources.values()
            if isinstance(resource, dict) and resource.get("Type") == "AWS::Serverless::LayerVersion"
            for path in _layer_import_paths(resource, base_dir)
        )
        env_parameter = (template.get("Parameters") or {}).get("Env") or {}
        default_stage = env_parameter.get("Default") if isinstance(env_parameter.get("Default"), str) else None
        return cls(
            functions=functions,
            routes=tuple(routes),
            layer_paths=layer_paths,
            default_stage=default_stage or DEFAULT_STAGE,
        )

    def find_route(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        for route in self.routes:
            parameters = route.match(path)
            if parameters is not None and route.method in (method, "ANY"):
                return route, parameters
        return None

    def methods_for(self, path: str) -> list[str]:
        return sorted({route.method for route in self.routes if route.match(path) is not None})


def _literal_str(value: object) -> str | None:
    """A template value usable as is: a plain scalar, not an intrinsic function."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


def _function_from_resource(
    logical_id: str, properties: Mapping[str, Any], globals_function: Mapping[str, Any], base_dir: Path
) -> LambdaFunction:
    def setting(name: str) -> Any:
        return properties.get(name, globals_function.get(name))

    code_uri = _literal_str(setting("CodeUri"))
    handler = _literal_str(setting("Handler"))
    if code_uri is None or handler is None or "." not in handler:
        raise ValueError(f"{logical_id}: needs a literal CodeUri and a Handler of the form module.function")
    environment: dict[str, str] = {}
    for source in (globals_function, properties):
        variables = ((source.get("Environment") or {}).get("Variables")) or {}
        for name, value in variables.items():
            literal = _literal_str(value)
            if literal is not None:
                environment[name] = literal
    timeout = _literal_str(setting("Timeout"))
    memory = _literal_str(setting("MemorySize"))
    return LambdaFunction(
        logical_id=logical_id,
        code_dir=(base_dir / code_uri).resolve(),
        handler=handler,
        timeout_seconds=int(timeout) if timeout else DEFAULT_TIMEOUT_SECONDS,
        memory_mb=int(memory) if memory else DEFAULT_MEMORY_MB,
        environment=environment,
    )


def _route_from_event(
    event_name: str, event: Mapping[str, Any], function: LambdaFunction, resources: Mapping[str, Any]
) -> Route:
    properties: dict[str, Any] = event.get("Properties") or {}
    path = _literal_str(properties.get("Path"))
    method = _literal_str(properties.get("Method"))
    if path is None or method is None:
        raise ValueError(f"{function.logical_id}.{event_name}: an Api event needs a literal Path and Method")
    authorizer = _literal_str((properties.get("Auth") or {}).get("Authorizer"))
    if authorizer is None:
        authorizer = _default_authorizer(properties.get("RestApiId"), resources)
    return Route(
        method=method.upper(),
        path=path,
        function=function,
        authorizer=authorizer,
        event_name=event_name,
    )


def _default_authorizer(rest_api_id: object, resources: Mapping[str, Any]) -> str:
    """The API's DefaultAuthorizer when the event names none (SAM's rule); NONE without one."""
    if isinstance(rest_api_id, dict) and isinstance(rest_api_id.get("Ref"), str):
        api = resources.get(rest_api_id["Ref"]) or {}
        default = ((api.get("Properties") or {}).get("Auth") or {}).get("DefaultAuthorizer")
        literal = _literal_str(default)
        if literal is not None:
            return literal
    return "NONE"


def _layer_import_paths(resource: Mapping[str, Any], base_dir: Path) -> list[Path]:
    # A built Python layer lands in /opt/python; the source tree holds the package at ContentUri
    # (BuildMethod) or under ContentUri/python (a pre-built layer).
    content_uri = _literal_str((resource.get("Properties") or {}).get("ContentUri"))
    if content_uri is None:
        return []
    root = (base_dir / content_uri).resolve()
    return [candidate for candidate in (root / "python", root) if candidate.is_dir()]


# ---------------------------------------------------------------------------- invoking


@dataclass
class LocalLambdaContext:
    """The parts of the Lambda context object handlers and Powertools read."""

    function_name: str
    aws_request_id: str
    timeout_seconds: int
    memory_limit_in_mb: int = DEFAULT_MEMORY_MB
    function_version: str = "$LATEST"
    _deadline: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        self._deadline = time.monotonic() + self.timeout_seconds

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:{LOCAL_REGION}:{LOCAL_ACCOUNT_ID}:function:{self.function_name}"

    @property
    def log_group_name(self) -> str:
        return f"/aws/lambda/{self.function_name}"

    @property
    def log_stream_name(self) -> str:
        return f"{datetime.now(UTC):%Y/%m/%d}/[$LATEST]local"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


class FunctionRunner:
    """Imports each function's handler module once (its cold start) and calls it in-process.

    All functions share this process and its environment, like one warm container each.
    """

    def __init__(self, service: ServiceDefinition, *, log: Callable[[str], None] | None = None) -> None:
        self._service = service
        self._log = log or _stderr
        self._handlers: dict[str, Handler] = {}
        self._lock = threading.Lock()
        for path in reversed(service.layer_paths):
            if str(path) not in sys.path:
                sys.path.insert(0, str(path))

    @property
    def service(self) -> ServiceDefinition:
        return self._service

    def apply_template_environment(self) -> list[str]:
        """Set the template's literal environment values that the environment does not set yet.

        Returns the names set. Values from the real environment always win, as with
        `sam local invoke --env-vars`; intrinsic values (!Ref ...) are left to the caller.
        """
        applied: list[str] = []
        for function in self._service.functions.values():
            for name, value in function.environment.items():
                if value and name not in os.environ:
                    os.environ[name] = value
                    applied.append(name)
        return applied

    def handler(self, logical_id: str) -> Handler:
        with self._lock:
            found = self._handlers.get(logical_id)
            if found is None:
                found = self._load(self._function(logical_id))
                self._handlers[logical_id] = found
            return found

    def invoke(self, logical_id: str, event: Any, *, request_id: str | None = None) -> Any:
        """Call a function's handler with `event` (a direct invoke); its exceptions propagate."""
        function = self._function(logical_id)
        handler = self.handler(logical_id)
        context = LocalLambdaContext(
            function_name=function.logical_id,
            aws_request_id=request_id or str(uuid.uuid4()),
            timeout_seconds=function.timeout_seconds,
            memory_limit_in_mb=function.memory_mb,
        )
        return handler(event, context)

    def _function(self, logical_id: str) -> LambdaFunction:
        try:
            return self._service.functions[logical_id]
        except KeyError:
            raise KeyError(f"no function {logical_id} in the template") from None

    def _load(self, function: LambdaFunction) -> Handler:
        path = function.module_path
        if not path.is_file():
            raise FileNotFoundError(f"{function.logical_id}: handler module {path} does not exist")
        # A unique module name per function: every handler module is called app.py.
        module_name = f"_local_lambda_{function.logical_id}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        started = time.perf_counter()
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
        handler = getattr(module, function.function_name, None)
        if not callable(handler):
            raise AttributeError(f"{path} has no callable {function.function_name}")
        shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
        self._log(
            f"cold start: {function.logical_id} ({shown}) imported in {(time.perf_counter() - started) * 1000:.0f} ms"
        )
        return cast(Handler, handler)


# ---------------------------------------------------------------------------- proxy events


@dataclass(frozen=True)
class HttpRequest:
    method: str
    target: str  # path and query as sent
    headers: tuple[tuple[str, str], ...]
    body: bytes
    source_ip: str = "127.0.0.1"


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def proxy_event(request: HttpRequest, route: Route, path_parameters: Mapping[str, str], stage: str) -> dict[str, Any]:
    """The API Gateway REST (v1) Lambda proxy event for `request` on `route`."""
    parts = urlsplit(request.target)
    path = parts.path or "/"
    single_headers: dict[str, str] = {}
    multi_headers: dict[str, list[str]] = {}
    for name, value in request.headers:
        # API Gateway keeps the last value in `headers`, every value in `multiValueHeaders`.
        single_headers[name] = value
        multi_headers.setdefault(name, []).append(value)
    multi_query: dict[str, list[str]] = {}
    for name, values in parse_qs(parts.query, keep_blank_values=True).items():
        multi_query[name] = values
    single_query = {name: values[-1] for name, values in multi_query.items()}
    body: str | None = None
    is_base64 = False
    if request.body:
        try:
            body = request.body.decode("utf-8")
        except UnicodeDecodeError:
            body, is_base64 = base64.b64encode(request.body).decode("ascii"), True
    now = datetime.now(UTC)
    host = single_headers.get("Host") or next(
        (value for name, value in request.headers if name.lower() == "host"), "localhost"
    )
    user_agent = next((value for name, value in request.headers if name.lower() == "user-agent"), None)
    return {
        "resource": route.path,
        "path": path,
        "httpMethod": request.method,
        "headers": single_headers or None,
        "multiValueHeaders": multi_headers or None,
        "queryStringParameters": single_query or None,
        "multiValueQueryStringParameters": multi_query or None,
        "pathParameters": dict(path_parameters) or None,
        "stageVariables": None,
        "requestContext": {
            "resourceId": "local",
            "resourcePath": route.path,
            "httpMethod": request.method,
            "extendedRequestId": uuid.uuid4().hex[:16],
            "requestTime": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "requestTimeEpoch": int(now.timestamp() * 1000),
            "path": f"/{stage}{path}",
            "accountId": LOCAL_ACCOUNT_ID,
            "protocol": "HTTP/1.1",
            "stage": stage,
            "domainPrefix": host.split(".", 1)[0].split(":", 1)[0],
            "requestId": str(uuid.uuid4()),
            "identity": _identity(route, request.source_ip, user_agent),
            "domainName": host,
            "apiId": LOCAL_API_ID,
        },
        "body": body,
        "isBase64Encoded": is_base64,
    }


def _identity(route: Route, source_ip: str, user_agent: str | None) -> dict[str, Any]:
    identity: dict[str, Any] = {
        "cognitoIdentityPoolId": None,
        "accountId": None,
        "cognitoIdentityId": None,
        "caller": None,
        "sourceIp": source_ip,
        "principalOrgId": None,
        "accessKey": None,
        "cognitoAuthenticationType": None,
        "cognitoAuthenticationProvider": None,
        "userArn": None,
        "userAgent": user_agent,
        "user": None,
    }
    if route.needs_iam:
        # What API Gateway fills in after it verified a SigV4 signature; locally every call is this caller.
        identity.update(
            accountId=LOCAL_ACCOUNT_ID,
            caller=LOCAL_CALLER,
            user=LOCAL_CALLER,
            userArn=LOCAL_CALLER_ARN,
            accessKey="ASIALOCALDEVELOPER00",
        )
    return identity


class BadProxyResponse(ValueError):
    """The handler's answer is not a Lambda proxy response (API Gateway answers 502)."""


def http_response_from_proxy(result: Any) -> HttpResponse:
    """The HTTP answer API Gateway makes of a Lambda proxy response; BadProxyResponse if it cannot."""
    if not isinstance(result, dict):
        raise BadProxyResponse(f"the handler returned {type(result).__name__}, not a proxy response object")
    status = result.get("statusCode")
    if isinstance(status, str) and status.isdigit():
        status = int(status)
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise BadProxyResponse("the proxy response has no valid statusCode")
    headers: list[tuple[str, str]] = []
    single = result.get("headers") or {}
    multi = result.get("multiValueHeaders") or {}
    if not isinstance(single, dict) or not isinstance(multi, dict):
        raise BadProxyResponse("headers and multiValueHeaders must be objects")
    # API Gateway merges both; a name in multiValueHeaders replaces the same name in headers.
    multi_names = {name.lower() for name in multi}
    for name, value in single.items():
        if name.lower() not in multi_names:
            headers.append((str(name), _header_value(value)))
    for name, values in multi.items():
        if not isinstance(values, list):
            raise BadProxyResponse(f"multiValueHeaders[{name!r}] must be a list")
        headers.extend((str(name), _header_value(value)) for value in values)
    body = result.get("body")
    if body is None:
        raw = b""
    elif not isinstance(body, str):
        raise BadProxyResponse("the proxy response body must be a string")
    elif result.get("isBase64Encoded"):
        try:
            raw = base64.b64decode(body, validate=True)
        except ValueError:
            raise BadProxyResponse("isBase64Encoded is set but the body is not base64") from None
    else:
        raw = body.encode("utf-8")
    return HttpResponse(status=status, headers=tuple(headers), body=raw)


def _header_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _json_response(status: int, payload: object, *headers: tuple[str, str]) -> HttpResponse:
    """JSON as the handlers write it: compact, and never kept by a cache."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    return HttpResponse(status, (("Content-Type", "application/json"), ("Cache-Control", "no-store"), *headers), body)


def error_response(status: int, code: str, message: str, *headers: tuple[str, str]) -> HttpResponse:
    """An answer in the service's error shape (DESIGN.md section 3)."""
    return _json_response(status, {"error": {"code": code, "message": message}}, *headers)


# ---------------------------------------------------------------------------- the server


class LocalApi(Running):
    """The local API server: real HTTP on a loopback port, served from a background thread.

    Example::

        with LocalApi(port=0) as api:
            requests.post(api.url + "/sonos/oauth/initiate", json={"userId": "u1"})
    """

    def __init__(
        self,
        template: Path = DEFAULT_TEMPLATE,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        stage: str | None = None,
        start_page: bool = True,
        demo_user_id: str = DEMO_USER_ID,
        apply_template_environment: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self._log = log or _stderr
        self.service = ServiceDefinition.from_template(template)
        self.runner = FunctionRunner(self.service, log=self._log)
        self.stage = stage or self.service.default_stage
        self.start_page = start_page
        self.demo_user_id = demo_user_id
        self._apply_environment = apply_template_environment
        self._host = host
        self._requested_port = port
        self._server: _LocalApiServer | None = None
        self._thread: threading.Thread | None = None
        self._applied_environment: list[str] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("the local API is already running")
        if self._apply_environment:
            self._applied_environment = self.runner.apply_template_environment()
        server = _LocalApiServer((self._host, self._requested_port))
        server.local_api = self
        self._server = server
        self._thread = serve_in_thread(server, name="local-api", poll_interval=SHUTDOWN_POLL_INTERVAL_SEC)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        shut_down(server, thread)
        self._server = self._thread = None
        for name in self._applied_environment:  # the process environment as it was before start()
            os.environ.pop(name, None)
        self._applied_environment = []

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the local API is not running: call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- requests ----------------------------------------------------------------------------

    def handle(self, request: HttpRequest) -> HttpResponse:
        """Answer one HTTP request: a template route through its handler, or a local page."""
        path = urlsplit(request.target).path or "/"
        found = self.service.find_route(request.method, path)
        if found is not None:
            route, path_parameters = found
            return self._call_route(request, route, path_parameters)
        if self.start_page:
            page = self._local_page(request, path)
            if page is not None:
                return page
        methods = self.service.methods_for(path)
        if methods:
            self._log(f"{request.method} {path} -> 405 (the template allows {', '.join(methods)})")
            return error_response(
                405,
                "method_not_allowed",
                f"{request.method} is not allowed on {path}; use {', '.join(methods)}.",
                ("Allow", ", ".join(methods)),
            )
        self._log(f"{request.method} {path} -> 404 (no route in the template)")
        return error_response(404, "not_found", f"No route for {request.method} {path}.")

    def _call_route(self, request: HttpRequest, route: Route, path_parameters: Mapping[str, str]) -> HttpResponse:
        path = urlsplit(request.target).path
        event = proxy_event(request, route, path_parameters, self.stage)
        request_id = event["requestContext"]["requestId"]
        auth_note = (
            "auth AWS_IAM: accepted as the local caller (no SigV4 check locally)"
            if route.needs_iam
            else f"auth {route.authorizer}"
        )
        started = time.perf_counter()
        try:
            result = self.runner.invoke(route.function.logical_id, event, request_id=request_id)
            response = http_response_from_proxy(result)
        except BadProxyResponse as exc:
            self._log(f"{request.method} {path} -> {route.function.logical_id}: 502, {exc}")
            return HttpResponse(502, (("Content-Type", "application/json"),), _BAD_GATEWAY_BODY)
        except Exception as exc:  # noqa: BLE001 - a crashed Lambda is API Gateway's 502, not a dropped client
            # The exception's message could quote request data: name it and where it was raised only.
            where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            place = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
            self._log(
                f"{request.method} {path} -> {route.function.logical_id}: 502, the handler raised "
                f"{type(exc).__name__}{place}"
            )
            return HttpResponse(502, (("Content-Type", "application/json"),), _BAD_GATEWAY_BODY)
        elapsed_ms = (time.perf_counter() - started) * 1000
        # The path only, never the query: the callback's query carries the authorization code.
        self._log(
            f"{request.method} {path} -> {route.function.logical_id} {response.status} "
            f"in {elapsed_ms:.1f} ms ({auth_note})"
        )
        return response

    def invoke_route(
        self,
        method: str,
        path: str,
        *,
        body: object | None = None,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> HttpResponse:
        """Call a template route in-process as if over HTTP (the start page's buttons use it)."""
        target = path + ("?" + urlencode(query) if query else "")
        raw_body = b"" if body is None else json.dumps(body).encode()
        all_headers = {"Host": "localhost", "Accept": "application/json", **(headers or {})}
        if body is not None:
            all_headers.setdefault("Content-Type", "application/json")
        return self.handle(HttpRequest(method, target, tuple(all_headers.items()), raw_body))

    # -- the local start page ------------------------------------------------------------------

    def _local_page(self, request: HttpRequest, path: str) -> HttpResponse | None:
        if path == START_PAGE_PATH and request.method in ("GET", "HEAD"):
            return self._start_page(_query_value(request.target, "userId") or self.demo_user_id)
        if path == ROUTES_PATH and request.method == "GET":
            return _json_response(200, {"routes": [_describe_route(route) for route in self.service.routes]})
        if path == CONNECT_PATH and request.method == "POST":
            return self._connect(_form_value(request.body, "userId") or self.demo_user_id)
        if path == DISCONNECT_PATH and request.method == "POST":
            return self._disconnect(_form_value(request.body, "userId") or self.demo_user_id)
        return None

    def _connect(self, user_id: str) -> HttpResponse:
        answer = self.invoke_route("POST", INITIATE_PATH, body={"userId": user_id})
        try:
            payload = json.loads(answer.body)
            authorization_url = payload["authorizationUrl"] if answer.status == 200 else None
        except (ValueError, KeyError, TypeError):
            authorization_url = None
        if not isinstance(authorization_url, str):
            return _html_response(
                answer.status if answer.status >= 400 else 502,
                "Could not start the link",
                f"<p>Initiate answered {answer.status}: <code>{html.escape(_error_code(answer.body))}</code></p>"
                '<p><a href="/">Back</a></p>',
            )
        # 303: the browser follows with a GET, as after any form post.
        return HttpResponse(303, (("Location", authorization_url), ("Cache-Control", "no-store")), b"")

    def _disconnect(self, user_id: str) -> HttpResponse:
        answer = self.invoke_route("DELETE", FETCH_PATH, query={"userId": user_id})
        if answer.status >= 400:
            return _html_response(
                answer.status,
                "Could not disconnect",
                f"<p>Revoke answered {answer.status}: <code>{html.escape(_error_code(answer.body))}</code></p>"
                '<p><a href="/">Back</a></p>',
            )
        return HttpResponse(303, (("Location", "/"), ("Cache-Control", "no-store")), b"")

    def _start_page(self, user: str) -> HttpResponse:
        status_html = self._connection_status_html(user) if self._has_route("GET", FETCH_PATH) else ""
        rows = "".join(
            f"<tr><td><code>{html.escape(route.method)}</code></td><td><code>{html.escape(route.path)}</code></td>"
            f"<td>{html.escape(route.function.logical_id)}</td><td>{html.escape(route.authorizer)}</td></tr>"
            for route in self.service.routes
        )
        connect = (
            f'<form method="post" action="{CONNECT_PATH}">'
            f'<input type="hidden" name="userId" value="{html.escape(user)}">'
            '<button id="connect" type="submit">Connect Sonos</button></form>'
            if self._has_route("POST", INITIATE_PATH)
            else "<p>The template has no initiate route.</p>"
        )
        disconnect = (
            f'<form method="post" action="{DISCONNECT_PATH}">'
            f'<input type="hidden" name="userId" value="{html.escape(user)}">'
            '<button id="disconnect" type="submit" class="secondary">Disconnect</button></form>'
            if self._has_route("DELETE", FETCH_PATH)
            else ""
        )
        content = (
            f"<h1>Sonos token service (local)</h1>"
            f"<p>Stage <code>{html.escape(self.stage)}</code>; the routes below come from template.yaml and run "
            "the real handlers in this process. AWS_IAM routes accept every local call.</p>"
            f"<h2>Demo user <code>{html.escape(user)}</code></h2>{status_html}"
            f'<div class="buttons">{connect}{disconnect}</div>'
            f"<h2>Routes</h2><table><tr><th>method</th><th>path</th><th>function</th><th>auth</th></tr>{rows}</table>"
        )
        return _html_response(200, "Sonos token service (local)", content)

    def _connection_status_html(self, user_id: str) -> str:
        answer = self.invoke_route("GET", FETCH_PATH, query={"userId": user_id})
        try:
            payload = json.loads(answer.body)
        except ValueError:
            payload = {}
        if answer.status == 200 and isinstance(payload, dict):
            # Never the token itself on a page: its length says enough that one is there.
            token = payload.get("accessToken")
            return (
                '<p id="status" class="ok">Connected: household '
                f"<code>{html.escape(str(payload.get('householdId')))}</code>, token expires "
                f"{html.escape(str(payload.get('expiresAt')))} (access token: {len(str(token or ''))} characters, "
                "not shown).</p>"
            )
        return (
            f'<p id="status">Not connected (fetch answered {answer.status} '
            f"<code>{html.escape(_error_code(answer.body))}</code>).</p>"
        )

    def _has_route(self, method: str, path: str) -> bool:
        return self.service.find_route(method, path) is not None


def _describe_route(route: Route) -> dict[str, str]:
    return {
        "method": route.method,
        "path": route.path,
        "function": route.function.logical_id,
        "handler": str(route.function.module_path),
        "authorizer": route.authorizer,
    }


def _error_code(body: bytes) -> str:
    try:
        payload = json.loads(body)
        return str(payload["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "no error code"


def _query_value(target: str, name: str) -> str | None:
    values = parse_qs(urlsplit(target).query).get(name)
    return values[0].strip() if values and values[0].strip() else None


def _form_value(body: bytes, name: str) -> str | None:
    values = parse_qs(body.decode("utf-8", errors="replace")).get(name)
    return values[0].strip() if values and values[0].strip() else None


_PAGE_STYLE: Final = """
body{margin:0;font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:#f5f5f7;color:#111}
main{max-width:46rem;margin:2rem auto;background:#fff;border-radius:14px;padding:2rem;
 box-shadow:0 2px 14px rgba(0,0,0,.08)}
h1{font-size:1.4rem;margin-top:0}h2{font-size:1.05rem;margin-top:1.6rem}
code{background:#f2f2f2;border-radius:4px;padding:.1rem .3rem}
table{border-collapse:collapse;width:100%;font-size:.9rem}td,th{text-align:left;padding:.3rem .5rem;
 border-bottom:1px solid #eee}
.buttons{display:flex;gap:.75rem}button{padding:.7rem 1.3rem;border-radius:999px;font-size:1rem;cursor:pointer;
 border:1px solid #111;background:#111;color:#fff}button.secondary{background:#fff;color:#111}
.ok{color:#0a6b2d}
"""


def _html_response(status: int, title: str, content: str) -> HttpResponse:
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_PAGE_STYLE}</style></head>"
        f"<body><main>{content}</main></body></html>"
    ).encode()
    return HttpResponse(status, (("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")), page)


class _LocalApiServer(QuietThreadingServer):
    label = "local-api"
    local_api: LocalApi

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _LocalApiHandler)


class _LocalApiHandler(KeepAliveHandler):
    server_version = "LocalApiGateway/1"

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_OPTIONS(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _serve(self, *, send_body: bool = True) -> None:
        api = cast(_LocalApiServer, self.server).local_api
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread rest would be parsed as the next request
            response = error_response(413, "invalid_request", "The request body is too large or malformed.")
        else:
            body = self.rfile.read(length) if length else b""
            request = HttpRequest(
                method=self.command,
                target=self.path,
                headers=tuple(self.headers.items()),
                body=body,
                source_ip=self.client_address[0],
            )
            response = api.handle(request)
        self._send(response, send_body=send_body)

    def _send(self, response: HttpResponse, *, send_body: bool) -> None:
        try:
            self.send_response(response.status)
            for name, value in response.headers:
                if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if send_body:
                self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return  # LocalApi logs each request itself, without the query


def _stderr(line: str) -> None:
    print(f"local-api: {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def running(template: Path = DEFAULT_TEMPLATE, **options: Any) -> Iterator[LocalApi]:
    """A started LocalApi for a `with` block (stopped however the block ends)."""
    api = LocalApi(template, **options)
    with api:
        yield api


# ---------------------------------------------------------------------------- command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.local_api",
        description="Serve template.yaml's API routes locally with the real handlers (Ctrl-C stops it).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--template", type=Path, default=DEFAULT_TEMPLATE)
    parser.add_argument("--stage", default=None, help="the stage in events (default: the template's Env default)")
    parser.add_argument("--demo-user", default=DEMO_USER_ID, help="the user the start page connects")
    parser.add_argument("--no-start-page", action="store_true", help="serve only the template's routes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    api = LocalApi(
        args.template,
        host=args.host,
        port=args.port,
        stage=args.stage,
        start_page=not args.no_start_page,
        demo_user_id=args.demo_user,
    )
    stop_requested = threading.Event()
    # SIGINT explicitly too: a shell starting us in the background leaves it ignored, not KeyboardInterrupt.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda signum, frame: stop_requested.set())
    with api:
        print(f"Local API listening on {api.url} (stage {api.stage})")
        for route in api.service.routes:
            print(f"  {route.method:<6} {api.url}{route.path}  -> {route.function.logical_id} ({route.authorizer})")
        if api.start_page:
            print(f"Start page: {api.url}/")
        sys.stdout.flush()
        stop_requested.wait()


if __name__ == "__main__":
    main()
