# Two entry points: `make demo` (set up, then run the pipeline on simulated tissue) and
# `make test` (set up, then lint and run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo_output

.PHONY: setup demo test bench clean

$(STAMP): requirement.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirement.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO)
	$(PY) preprocess/simulate_tissue.py --out_dir $(DEMO)/raw --n_samples 4
	$(PY) preprocess/Generate_Image_Label_locationMap.py --base_dir $(DEMO)/raw \
		--save_crop_dir $(DEMO)/crops --n_crops 20 --split 0.5 0.25 0.25
	$(PY) Analysis/generate_MappingRelationships.py --label_dir $(DEMO)/raw/labels \
		--spot_dir $(DEMO)/raw/spots --save_dir $(DEMO)/mapping
	@echo ""
	@echo "Demo outputs:"
	@echo "  simulated raw data : $(DEMO)/raw/{images,labels,spots} (truth in $(DEMO)/raw/truth)"
	@echo "  training crops     : $(DEMO)/crops/{train,val,test}/<sample>/"
	@echo "  transcript mapping : $(DEMO)/mapping/<sample>.csv and <sample>_cell_by_gene.csv"

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests -q

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
