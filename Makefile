# Two entry points: `make demo` (set up, then run the pipeline on simulated tissue) and
# `make test` (set up, then lint and run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo_output
DEMO_EPOCHS := 36

.PHONY: setup demo test bench clean

$(STAMP): requirement.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirement.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO)
	@echo "== 1/7 simulate 4 Xenium-like images (0.2125 µm/px, cells twice the nucleus, 1 transcript/µm²)"
	$(PY) preprocess/simulate_tissue.py --out_dir $(DEMO)/raw --n_samples 4 --preset dense
	@echo "== 2/7 crops with transcript density and gene channels, split into train/val/test"
	$(PY) preprocess/Generate_Image_Label_locationMap.py --base_dir $(DEMO)/raw \
		--save_crop_dir $(DEMO)/crops --n_crops 12 --crop_size 512 --split 0.5 0.25 0.25
	@echo "== 3/7 recursive training: starting nuclei grown by their transcripts, 2 rounds, small network"
	$(PY) GeneSeg_train.py --train_dir $(DEMO)/crops/train --val_dir $(DEMO)/crops/val \
		--test_dir $(DEMO)/crops/test --save_model_dir $(DEMO)/train_run --all_channels \
		--metrics --recursive_num 2 --n_epochs $(DEMO_EPOCHS) --learning_rate 0.01 --nbase 8 16 32 64 \
		--train_tile_size 112 --diam_mean 17 --diameter 0 --relabel_min_size 50 \
		--warm_start_rounds
	@echo "== 4/7 whole-image inference, transcript mapping and result files in one run"
	$(PY) Inference/slidingwindows_gradient.py --root_dir $(DEMO)/raw \
		--save_dir $(DEMO)/inference --model_file "$$(ls -t $(DEMO)/train_run/models/*_last.pt | head -n 1)" \
		--diameter 0 --outputs "$$($(PY) -c 'import importlib.util as u; print("csv,h5ad,geojson,geoparquet,xenium,qc" + (",spatialdata" if u.find_spec("spatialdata") else ""))')"
	@echo "== 5/7 mapping with the starting labels, for comparison"
	$(PY) Analysis/generate_MappingRelationships.py --label_dir $(DEMO)/raw/labels \
		--spot_dir $(DEMO)/raw/spots --save_dir $(DEMO)/mapping_starting_labels
	@echo "== 6/7 scores against the simulated truth: starting nuclei, nuclei expanded by 5 µm (vendors' default), GeneSegNet"
	$(PY) Analysis/compare_to_truth.py --label_dir $(DEMO)/raw/labels \
		--truth_dir $(DEMO)/raw/truth --out_csv $(DEMO)/scores_starting_labels.csv
	$(PY) Analysis/compare_to_truth.py --label_dir $(DEMO)/raw/labels --expand_um 5 \
		--truth_dir $(DEMO)/raw/truth --out_csv $(DEMO)/scores_nuclei_expanded_5um.csv
	$(PY) Analysis/compare_to_truth.py --label_dir $(DEMO)/inference \
		--truth_dir $(DEMO)/raw/truth --out_csv $(DEMO)/scores_genesegnet.csv
	@echo "== 7/7 summary (mean over the 4 images; the test image is $$(ls $(DEMO)/crops/test))"
	@$(PY) -c "import pandas as pd; cols=['AP@0.5','AP@0.75','AP@0.9','right_cell','background_in_cells','recall@0.5']; \
		rows={n: pd.read_csv('$(DEMO)/scores_'+n+'.csv').set_index('sample').loc['mean', cols] for n in ('starting_labels','nuclei_expanded_5um','genesegnet')}; \
		print(pd.DataFrame(rows).T.round(3).to_string())"
	@echo ""
	@echo "Demo outputs:"
	@echo "  simulated raw data   : $(DEMO)/raw/{images,labels,spots,metadata} (truth in $(DEMO)/raw/truth)"
	@echo "  training crops       : $(DEMO)/crops/{train,val,test}/<sample>/ (grown and refined labels in newlabels/)"
	@echo "  models and run record: $(DEMO)/train_run/models/, $(DEMO)/train_run/run_*.json"
	@echo "  whole-image masks    : $(DEMO)/inference/label_<sample>.{png,mat}, label_plt_<sample>.jpg"
	@echo "  transcript mapping   : $(DEMO)/inference/mapping/<sample>.csv (with confidence columns), <sample>_cell_by_gene.csv"
	@echo "  result files         : $(DEMO)/inference/mapping/ (<sample>.h5ad, <sample>_cells.geojson/.parquet, xenium/, <sample>_qc/qc.html, <sample>.zarr SpatialData where installed)"
	@echo "  scores vs truth      : $(DEMO)/scores_{starting_labels,nuclei_expanded_5um,genesegnet}.csv"

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests -q

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
