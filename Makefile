# The two commands that matter: `make demo` (the main job, end to end) and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
REQS := layers/token_manager/requirements.txt layers/postgres_driver/requirements.txt requirements-dev.txt

.PHONY: help demo test venv lint invoke local-api bench openapi sam-build sam-validate clean

help:
	@echo "make demo        run the whole service end to end on this machine (main job)"
	@echo "make test        lint, type-check, template lint and the tests on real Redis + Postgres"
	@echo "make invoke      run every sample event in events/ through its handler in-process"
	@echo "                 (one: make invoke FN=token_fetch EVENT=events/token_fetch_direct.json)"
	@echo "make local-api   the service locally (Sonos stand-in + local API): open http://127.0.0.1:3000/"
	@echo "make bench       performance figures against their targets, one table (docs/benchmarks.md)"
	@echo "make openapi     check docs/openapi.yaml against the routes the handlers declare"
	@echo "make sam-validate / sam-build   SAM CLI checks (own tool venv)"

$(VENV)/.requirements.sha256: $(REQS) scripts/bootstrap-venv.sh
	scripts/bootstrap-venv.sh

venv: $(VENV)/.requirements.sha256

test: venv
	scripts/ensure-chromium.sh
	scripts/with-services.sh scripts/run-tests.sh

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/mypy && $(VENV)/bin/cfn-lint --non-zero-exit-code error template.yaml

demo:
	scripts/demo.sh

local-api:
	scripts/local-api.sh

bench: venv
	scripts/with-services.sh scripts/bench.sh

invoke: venv
	scripts/with-services.sh $(PY) scripts/invoke.py $(if $(EVENT),--event $(EVENT)) $(if $(FN),--function $(FN))

openapi: venv
	$(PY) scripts/openapi.py --check

sam-validate:
	scripts/sam.sh validate

sam-build:
	scripts/sam.sh build

clean:
	rm -rf $(VENV) .venv-sam .aws-sam
