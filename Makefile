# pi05-export developer targets. `make install` then `make test` (the README's two set-up commands).
PY ?= .venv/bin/python
PIP ?= .venv/bin/pip
OUT ?= out/tiny

.PHONY: install test test-gpu lint typecheck demo validate-tiny ci-validate bench-export clean

install:  ## venv with the CPU torch build, the package, and every extra the tests use
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev,quant,jax]"
	$(PIP) install -q --no-deps "tensorrt-stubs==10.13.0.35.1"

test:  ## fast CPU tests (GPU/TensorRT tests skip with the reason)
	$(PY) -m pytest -q -n 2 --dist loadfile

test-gpu:  ## everything, on a machine with CUDA and TensorRT
	$(PY) -m pytest -q

lint:
	.venv/bin/ruff check pi05_export tests benchmarks

typecheck:  ## the TensorRT-touching module against the TensorRT 10.13 API stubs (JetPack 7)
	.venv/bin/mypy pi05_export/trt.py

demo:  ## the main job on the embedded tiny preset: export -> validate (ONNX Runtime)
	.venv/bin/pi05-export onnx --preset tiny --random-init --out $(OUT)
	.venv/bin/pi05-export validate $(OUT)

ci-validate:  ## the CI engine-validation job on tiny: fp32 and fp16 graphs on ONNX Runtime
	.venv/bin/pi05-export onnx --preset tiny --random-init --out out/ci-fp32
	.venv/bin/pi05-export validate out/ci-fp32
	.venv/bin/pi05-export onnx --preset tiny --random-init --precision fp16 --out out/ci-fp16
	.venv/bin/pi05-export validate out/ci-fp16

bench-export:  ## full-size export of all components: wall time and peak RSS per component
	$(PY) benchmarks/bench_export.py --precision fp16

clean:
	rm -rf out .pytest_cache
