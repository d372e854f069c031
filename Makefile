# Two commands for a new user: `make run` (set up, then the whole pipeline on the embedded sample competition)
# and `make test` (set up, then the test suite; .ci/run calls it).
VENV := .venv
BOOT_PYTHON ?= $(shell command -v python3.11 || command -v python3)
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: install run test lint format bench submit clean

install: $(VENV)/.installed

# Exact pins in requirements.txt (torch 2.15.0 + torchvision 0.29.2: the CUDA build, which also runs on CPU).
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(BOOT_PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

run: install
	dvc repro
	python -m kagglecls.summary

test: install
	python -m pytest -q -p no:cacheprovider tests

lint: install
	ruff format --check src stages tests bench
	ruff check src stages tests bench

format: install
	ruff format src stages tests bench
	ruff check --fix src stages tests bench

bench: install
	python bench/run_all.py

# make submit MESSAGE="what changed": validates data/submission.csv, uploads it with the kaggle client, waits
# for the public score and records it in submissions/history.csv (commit that file).
submit: install
	kagglecls-submit --wait --message "$(MESSAGE)"

clean:
	rm -rf data models dvclive plots
