//! Every kernel in kernels/ compiles with NVRTC (libnvrtc from PyPI's nvidia-cuda-nvrtc, put on
//! LD_LIBRARY_PATH by scripts/test.sh), for Ampere and Hopper, and defines its entry points.
//! This runs on machines with no GPU; running the kernels is scripts/gpu-check.sh's job.

#[test]
fn every_kernel_compiles_with_nvrtc() {
    for arch in ["compute_80", "compute_90"] {
        match baton_cuda::compile_all(arch) {
            Ok(ptx) => assert_eq!(ptx.len(), baton_cuda::KERNELS.len()),
            Err(e) => panic!("{arch}: {e} (run the tests with scripts/test.sh, which installs nvidia-cuda-nvrtc)"),
        }
    }
}

#[test]
fn no_driver_is_an_error_not_a_panic() {
    // On these CI machines there is no libcuda: the probe must say so. Where a driver exists it
    // must succeed. Either way it returns.
    let r = baton_cuda::probe_driver();
    if let Err(e) = &r {
        assert!(e.to_string().contains("libcuda"));
    }
}

#[test]
fn a_broken_kernel_is_reported() {
    // Guards the test above: NVRTC really compiles (and rejects) what it is given.
    let opts = cudarc::nvrtc::CompileOptions { arch: Some("compute_80"), ..Default::default() };
    let r = cudarc::nvrtc::compile_ptx_with_opts("extern \"C\" __global__ void broken(float* x { x[0] = 1; }", opts);
    assert!(r.is_err(), "NVRTC accepted a syntax error");
}

#[test]
fn selecting_the_cuda_backend_without_a_gpu_is_an_error_not_a_panic() {
    match baton_cuda::backend::CudaBackend::new(0) {
        Ok(_) => {} // a machine with a GPU
        Err(e) => assert!(e.to_string().contains("libcuda") || e.to_string().contains("CUDA"), "{e}"),
    }
}
