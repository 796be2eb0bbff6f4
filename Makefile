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
	@echo "== 1/6 simulate tissue (images, noisy starting labels, spots, truth)"
	$(PY) preprocess/simulate_tissue.py --out_dir $(DEMO)/raw --n_samples 4
	@echo "== 2/6 crops and heatmaps, split into train/val/test"
	$(PY) preprocess/Generate_Image_Label_locationMap.py --base_dir $(DEMO)/raw \
		--save_crop_dir $(DEMO)/crops --n_crops 20 --split 0.5 0.25 0.25
	@echo "== 3/6 recursive training: 2 rounds, a small network and few epochs for the demo"
	$(PY) GeneSeg_train.py --train_dir $(DEMO)/crops/train --val_dir $(DEMO)/crops/val \
		--test_dir $(DEMO)/crops/test --save_model_dir $(DEMO)/train_run --all_channels \
		--metrics --recursive_num 2 --n_epochs 12 --learning_rate 0.01 --nbase 8 16 32 64 \
		--train_tile_size 112 --diam_mean 17 --diameter 0 --relabel_min_size 50 \
		--warm_start_rounds
	@echo "== 4/6 whole-image inference and transcript mapping in one run"
	$(PY) Inference/slidingwindows_gradient.py --root_dir $(DEMO)/raw \
		--save_dir $(DEMO)/inference --model_file "$$(ls -t $(DEMO)/train_run/models/*_last.pt | head -n 1)" \
		--diameter 0 --mapping
	@echo "== 5/6 mapping with the starting labels, for comparison"
	$(PY) Analysis/generate_MappingRelationships.py --label_dir $(DEMO)/raw/labels \
		--spot_dir $(DEMO)/raw/spots --save_dir $(DEMO)/mapping_starting_labels
	@echo "== 6/6 scores against the simulated truth"
	$(PY) Analysis/compare_to_truth.py --label_dir $(DEMO)/raw/labels \
		--truth_dir $(DEMO)/raw/truth --out_csv $(DEMO)/scores_starting_labels.csv
	$(PY) Analysis/compare_to_truth.py --label_dir $(DEMO)/inference \
		--truth_dir $(DEMO)/raw/truth --out_csv $(DEMO)/scores_genesegnet.csv
	@echo ""
	@echo "Demo outputs:"
	@echo "  simulated raw data   : $(DEMO)/raw/{images,labels,spots} (truth in $(DEMO)/raw/truth)"
	@echo "  training crops       : $(DEMO)/crops/{train,val,test}/<sample>/ (refined labels in newlabels/)"
	@echo "  models and run record: $(DEMO)/train_run/models/, $(DEMO)/train_run/run_*.json"
	@echo "  whole-image masks    : $(DEMO)/inference/label_<sample>.{png,mat}, label_plt_<sample>.jpg"
	@echo "  transcript mapping   : $(DEMO)/inference/mapping/<sample>.csv and <sample>_cell_by_gene.csv"
	@echo "  scores vs truth      : $(DEMO)/scores_starting_labels.csv, $(DEMO)/scores_genesegnet.csv"

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests -q

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
