# pi05-export developer targets. `make install` then `make test` (the README's two set-up commands).
PY ?= .venv/bin/python
PIP ?= .venv/bin/pip
OUT ?= out/tiny

.PHONY: install test test-gpu lint typecheck demo policy-demo bench-policy bench-serve ci-validate bench-export bench-convert bench-tiny bench-gpu bench-quantize calibration-pi05 nvfp4-parity clean

install:  ## venv with the CPU torch build, the package, and every extra the tests use
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[export,dev,quant,jax]"
	$(PIP) install -q --no-deps "openpi-client==0.1.2" "dm-tree>=0.1.8"  # test client; its numpy<2 pin is stale
	$(PIP) install -q --no-deps "tensorrt-stubs==10.13.0.35.1"

test:  ## fast CPU tests (GPU/TensorRT tests skip with the reason)
	$(PY) -m pytest -q -n 2 --dist loadfile

test-gpu:  ## everything, on a machine with CUDA and TensorRT
	$(PY) -m pytest -q

lint:
	.venv/bin/ruff check pi05_export tests benchmarks

typecheck:  ## pi05_export/trt.py against tensorrt-stubs 10.13 (JetPack 7's TensorRT API), stubs repaired in a temp dir
	@SP=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); D=$$(mktemp -d); \
	cp -r "$$SP/tensorrt" "$$SP/tensorrt_bindings" "$$D/" && \
	sed -i -E 's/([(,] )in: /\1in_: /g; s/, channel_axis: int\) -> IScaleLayer/, channel_axis: int = ...) -> IScaleLayer/' "$$D/tensorrt_bindings/tensorrt.pyi" && \
	printf '[mypy]\nstrict = True\nfollow_imports = silent\nfollow_imports_for_stubs = True\nmypy_path = %s\n[mypy-polygraphy.*]\nignore_missing_imports = True\n' "$$D" > "$$D/mypy.ini" && \
	.venv/bin/mypy --config-file "$$D/mypy.ini" pi05_export/trt.py; rc=$$?; rm -rf "$$D"; exit $$rc

demo:  ## the main job on the embedded tiny preset: export -> validate (ONNX Runtime)
	.venv/bin/pi05-export onnx --preset tiny --random-init --out $(OUT)
	.venv/bin/pi05-export validate $(OUT)

policy-demo:  ## a tiny openpi-style checkpoint (weights, norm stats, tokenizer), then robot actions from a raw LIBERO observation
	$(PY) -m pi05_export.testing.tiny_policy out/tiny-policy
	.venv/bin/pi05-export infer out/tiny-policy --robot libero --inputs out/tiny-policy/examples/libero.npz --out out/tiny-policy/actions.npz

ci-validate:  ## the CI engine-validation job on tiny: fp32, fp16, FP8 and FP4/FP8 graphs on ONNX Runtime
	.venv/bin/pi05-export onnx --preset tiny --random-init --out out/ci-fp32
	.venv/bin/pi05-export validate out/ci-fp32
	.venv/bin/pi05-export onnx --preset tiny --random-init --precision fp16 --out out/ci-fp16
	.venv/bin/pi05-export validate out/ci-fp16
	.venv/bin/pi05-export quantize --preset tiny --random-init --recipe fp8 --out out/ci-fp32
	.venv/bin/pi05-export validate out/ci-fp32/fp8
	.venv/bin/pi05-export quantize --preset tiny --random-init --recipe mixed_fp4_fp8 --out out/ci-fp32
	.venv/bin/pi05-export validate out/ci-fp32/mixed_fp4_fp8

bench-export:  ## full-size export of all components: wall time and peak RSS per component
	/usr/bin/time -v $(PY) benchmarks/bench_export.py --precision fp16

bench-convert:  ## full-size orbax -> safetensors conversion: peak RSS and time (~25 GB disk in /tmp, ~4 min)
	$(PY) benchmarks/bench_convert.py --workdir /tmp/pi05_bench_convert

bench-tiny:  ## bench machinery on the CPU
	.venv/bin/pi05-export bench --preset tiny --random-init --device cpu --dtype fp32 --steps 1,3,10

bench-gpu:  ## full-size PyTorch backends on one GPU; JSON lines in out/bench/results.jsonl
	OUT=out/bench benchmarks/h200_bench.sh

bench-policy:  ## one Policy.infer split into pre/model/post, full size on a GPU (3 x 480x640 cameras)
	$(PY) benchmarks/bench_policy.py --preset pi05 --backends torch,torch-compile-cudagraph

bench-serve:  ## 8 openpi-client clients x 100 requests against the tiny policy, batching off and on; 1000 bad requests
	$(PY) benchmarks/bench_serve.py --max-batch 1,8

bench-quantize:  ## full-size fp8 quantize: peak RSS + time per component (~11 min, 14 GiB)
	$(PY) benchmarks/bench_quantize.py --preset pi05 --recipe fp8 --samples 1 --steps 10

calibration-pi05:  ## regenerate the photo calibration set at 224x224 for the full-size model
	.venv/bin/pi05-export calibration-build --photos --preset pi05 --out pi05_export/calibration_sets/pi05

nvfp4-parity:  ## ModelOpt CUDA kernels vs the CPU NVFP4 emulation (needs a CUDA GPU + nvidia-modelopt)
	$(PY) benchmarks/nvfp4_parity.py docs/nvfp4_parity.json

clean:
	rm -rf out .pytest_cache
