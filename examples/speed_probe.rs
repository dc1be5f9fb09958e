use backei::*;
use std::time::Instant;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map(|s| s.as_str()).unwrap_or("mnist");
    let b: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(50);
    let t: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(4);
    let mut spec = NetworkSpec::preset(name).unwrap();
    spec.steps = t;
    let mut net = Network::<f32>::new(&spec, 1).unwrap();
    let mut opt = Optimizer::new(OptimizerConfig::adam(1e-3), net.num_params()).unwrap();
    let n: usize = spec.input.iter().product::<usize>() * b;
    let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 255) as f32 / 255.0).collect();
    let labels: Vec<u8> = (0..b).map(|i| (i % 10) as u8).collect();
    for _ in 0..3 {
        let t0 = Instant::now();
        let s = net.train_step(&x, 1, &labels, Loss::Mse, &mut opt).unwrap();
        println!("{name} B={b} T={t}: {:.3}s loss {:.4} stats {:?}", t0.elapsed().as_secs_f64(), s.loss, net.spike_stats());
    }
}
