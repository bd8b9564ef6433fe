.PHONY: install run test ui clean
VENV := .venv
BIN := $(VENV)/bin

install:
	@scripts/install.sh

run: install
	$(BIN)/feedpipe run
	@echo
	$(BIN)/feedpipe feed --limit 10
	@echo
	$(BIN)/feedpipe report

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

ui: install
	$(BIN)/feedpipe ui

clean:
	-$(BIN)/feedpipe db stop 2>/dev/null
	rm -rf .feedpipe
