// Feature views computed in the page from /v1/features tensors (no libraries): the PCA of patch
// tokens mapped to RGB with a robust range (as NVlabs RADIO's examples/visualize_features.py:
// per component, values more than M median absolute deviations from the median are outliers and
// do not set the colour range), and colour maps for CLS attention.
"use strict";

const Views = (() => {
  const MAD_M = 2;  // RADIO's get_robust_pca default

  // base64 of little-endian float32 / float16 bytes -> Float32Array
  function decodeTensor(tensor) {
    const bin = atob(tensor.data);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const view = new DataView(bytes.buffer);
    const n = tensor.dtype === "float16" ? bytes.length / 2 : bytes.length / 4;
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      out[i] = tensor.dtype === "float16" ? half(view.getUint16(2 * i, true)) : view.getFloat32(4 * i, true);
    }
    return out;
  }

  function half(h) {
    const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
    if (e === 0) return s * Math.pow(2, -14) * (f / 1024);
    if (e === 31) return f ? NaN : s * Infinity;
    return s * Math.pow(2, e - 15) * (1 + f / 1024);
  }

  // Top-k principal directions of X [n, d] (row-major) by power iteration with deflation.
  // Returns {mean: Float64Array(d), components: [Float64Array(d) x k]}.
  function pca(X, n, d, k = 3, iterations = 200) {
    const mean = new Float64Array(d);
    for (let i = 0; i < n; i++) for (let j = 0; j < d; j++) mean[j] += X[i * d + j] / n;
    const C = new Float64Array(n * d);
    for (let i = 0; i < n; i++) for (let j = 0; j < d; j++) C[i * d + j] = X[i * d + j] - mean[j];
    const components = [];
    let seed = 12345;
    const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648) - 0.5;
    for (let c = 0; c < k; c++) {
      let v = new Float64Array(d).map(rand);
      for (let it = 0; it < iterations; it++) {
        const u = new Float64Array(n);  // u = C v
        for (let i = 0; i < n; i++) { let s = 0; for (let j = 0; j < d; j++) s += C[i * d + j] * v[j]; u[i] = s; }
        const w = new Float64Array(d);  // w = C^T u
        for (let i = 0; i < n; i++) { const ui = u[i]; for (let j = 0; j < d; j++) w[j] += C[i * d + j] * ui; }
        for (const p of components) {   // deflate: stay orthogonal to the components found
          let dot = 0; for (let j = 0; j < d; j++) dot += w[j] * p[j];
          for (let j = 0; j < d; j++) w[j] -= dot * p[j];
        }
        let norm = 0; for (let j = 0; j < d; j++) norm += w[j] * w[j];
        norm = Math.sqrt(norm);
        if (norm < 1e-12) break;
        v = w.map((x) => x / norm);
      }
      components.push(v);
    }
    return { mean, components };
  }

  function median(values) {
    const s = Float64Array.from(values).sort();
    const m = s.length >> 1;
    return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
  }

  // [n, 3] projections -> per-channel [lo, hi] from the inliers (|x - median| / MAD < MAD_M).
  function robustRange(P, n) {
    const ranges = [];
    for (let c = 0; c < 3; c++) {
      const col = new Float64Array(n);
      for (let i = 0; i < n; i++) col[i] = P[i * 3 + c];
      const med = median(col);
      const dev = col.map((x) => Math.abs(x - med));
      const mdev = median(dev) || 1e-12;
      let lo = Infinity, hi = -Infinity;
      for (let i = 0; i < n; i++) if (dev[i] / mdev < MAD_M) { lo = Math.min(lo, col[i]); hi = Math.max(hi, col[i]); }
      if (!(hi > lo)) { lo = Math.min(...col); hi = Math.max(...col) + 1e-12; }
      ranges.push([lo, hi]);
    }
    return ranges;
  }

  // Patch tokens [n, d] -> RGBA bytes [n, 4]: PCA to 3 components, robust range, clipped.
  function pcaColours(X, n, d) {
    const { mean, components } = pca(X, n, d);
    const P = new Float64Array(n * 3);
    for (let i = 0; i < n; i++) {
      for (let c = 0; c < 3; c++) {
        let s = 0; const p = components[c];
        for (let j = 0; j < d; j++) s += (X[i * d + j] - mean[j]) * p[j];
        P[i * 3 + c] = s;
      }
    }
    const ranges = robustRange(P, n);
    const rgba = new Uint8ClampedArray(n * 4);
    for (let i = 0; i < n; i++) {
      for (let c = 0; c < 3; c++) {
        const [lo, hi] = ranges[c];
        rgba[i * 4 + c] = Math.round(255 * Math.min(1, Math.max(0, (P[i * 3 + c] - lo) / (hi - lo))));
      }
      rgba[i * 4 + 3] = 255;
    }
    return rgba;
  }

  // A perceptual-ish dark-to-bright ramp (black, purple, orange, yellow) for attention.
  const STOPS = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
  function heat(t) {
    const x = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
    const i = Math.min(STOPS.length - 2, Math.floor(x)), f = x - i;
    return STOPS[i].map((a, c) => Math.round(a + f * (STOPS[i + 1][c] - a)));
  }

  // Weights [n] -> RGBA bytes [n, 4], scaled to their own min..max.
  function heatColours(values) {
    let lo = Infinity, hi = -Infinity;
    for (const v of values) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    const rgba = new Uint8ClampedArray(values.length * 4);
    values.forEach((v, i) => {
      const [r, g, b] = heat((v - lo) / ((hi - lo) || 1));
      rgba.set([r, g, b, 255], i * 4);
    });
    return rgba;
  }

  // Draw RGBA [h*w, 4] as an h x w grid onto `canvas`, each cell a block (no smoothing).
  function drawGrid(canvas, rgba, h, w) {
    const small = document.createElement("canvas");
    small.width = w; small.height = h;
    small.getContext("2d").putImageData(new ImageData(rgba, w, h), 0, 0);
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
    canvas.dataset.drawn = "1";
  }

  return { decodeTensor, pca, robustRange, pcaColours, heatColours, drawGrid };
})();
