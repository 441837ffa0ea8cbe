// Local mode: the served bundle's graph runs in this browser (onnxruntime-web, WebAssembly); photos never leave
// it. The photo becomes the same input tensor as Python's decode_image: EXIF orientation applied, transparency
// composited on white, then Pillow's bilinear resize, ported below with its fixed-point arithmetic. One
// difference, by design: Pillow decodes a JPEG at least twice the model's input size at a reduced scale (its
// draft mode), a browser cannot, so such photos can differ by a few levels (the label agrees in the tests).
// The "neither" rules and the label are decided as predict.py decides them, from the rules in bundle.json.

const PRECISION_BITS = 32 - 8 - 2; // Pillow's Resample.c, 8 bits a channel

// Pillow's precompute_coeffs for the bilinear filter (support 1), then normalize_coeffs_8bpc.
function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1.0);
  const support = 1.0 * filterScale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const weights = new Int32Array(outSize * ksize);
  const row = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1.0 / filterScale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let total = 0;
    for (let x = 0; x < xmax; x++) {
      const t = Math.abs((x + xmin - center + 0.5) * ss);
      const w = t < 1.0 ? 1.0 - t : 0.0;
      row[x] = w;
      total += w;
    }
    for (let x = 0; x < ksize; x++) {
      const w = x < xmax && total !== 0 ? row[x] / total : 0;
      weights[xx * ksize + x] = w < 0 ? Math.trunc(-0.5 + w * (1 << PRECISION_BITS))
        : Math.trunc(0.5 + w * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, weights };
}

const clip8 = (v) => (v >= (1 << PRECISION_BITS) * 256 ? 255 : v <= 0 ? 0 : Math.floor(v / (1 << PRECISION_BITS)));

// One pass of Pillow's resampling along one axis, rounding to 8 bits: `src` has `channels` bytes a pixel (RGBA
// or RGB), the result RGB; `along` "x" resizes the rows to `size` pixels, "y" the columns.
function pass(src, width, height, channels, along, size) {
  const { ksize, bounds, weights } = coefficients(along === "x" ? width : height, size);
  const outWidth = along === "x" ? size : width;
  const outHeight = along === "x" ? height : size;
  const out = new Uint8Array(outWidth * outHeight * 3);
  const half = 1 << (PRECISION_BITS - 1);
  for (let y = 0; y < outHeight; y++) {
    for (let x = 0; x < outWidth; x++) {
      const i = along === "x" ? x : y; // the output position along the axis
      const min = bounds[i * 2];
      const taps = bounds[i * 2 + 1];
      for (let c = 0; c < 3; c++) {
        let ss = half;
        for (let t = 0; t < taps; t++) {
          const source = along === "x" ? y * width + min + t : (min + t) * width + x;
          ss += src[source * channels + c] * weights[i * ksize + t];
        }
        out[(y * outWidth + x) * 3 + c] = clip8(ss);
      }
    }
  }
  return out;
}

// data.resize_square: the rows resized, then the columns (each pass skipped when its size is already right).
// `pixels` is RGBA (a canvas's); the result RGB.
export function resizeBilinear(pixels, width, height, size) {
  if (size === width && size === height) return pass(pixels, width, height, 4, "x", size); // the identity
  const rows = size === width ? null : pass(pixels, width, height, 4, "x", size);
  if (size === height) return rows;
  return rows ? pass(rows, size, height, 3, "y", size) : pass(pixels, width, height, 4, "y", size);
}

// A photo file as the model's input: decoded upright, on white, resized; (size x size x 3) uint8.
export async function preprocess(blob, size) {
  const bitmap = await createImageBitmap(blob, { imageOrientation: "from-image", colorSpaceConversion: "none",
    premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.fillStyle = "#fff";
  context.fillRect(0, 0, bitmap.width, bitmap.height);
  context.drawImage(bitmap, 0, 0);
  const pixels = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
  bitmap.close();
  return resizeBilinear(pixels, canvas.width, canvas.height, size);
}

const sigmoid = (x) => 1 / (1 + Math.exp(-x));
const clamp = (p, low) => Math.min(Math.max(p, low), 1 - low);
const logit = (p) => { const q = clamp(p, 1e-12); return Math.log(q) - Math.log1p(-q); };
const petMass = (probabilities, indices) => indices.reduce((sum, i) => sum + probabilities[i], 0);

// Pillow's ImageStat standard deviation of each channel (from sums, as its histogram gives them).
function flat(image, maxStd) {
  const n = image.length / 3;
  for (let c = 0; c < 3; c++) {
    let sum = 0;
    let squares = 0;
    for (let i = c; i < image.length; i += 3) { sum += image[i]; squares += image[i] * image[i]; }
    if (Math.sqrt(Math.max(0, (squares - (sum * sum) / n) / n)) > maxStd) return false;
  }
  return true;
}

// Each rule's probability of "neither" and whether it fires, as Classifier._rule_scores gives them.
function ruleScore(rule, outputs) {
  if (rule.kind === "imagenet") {
    const mass = petMass(outputs[rule.output || "imagenet_probabilities"], rule.pet_indices);
    return { p: sigmoid(logit(1 - mass) - logit(1 - rule.min_pet_probability)), fires: mass < rule.min_pet_probability };
  }
  const score = outputs[rule.output || "neither_probability"][0];
  if (rule.kind === "learned") return { p: sigmoid(logit(score) - logit(rule.max)), fires: score > rule.max };
  const w = rule.weights;
  let evidence = logit(score) * w.learned + w.bias;
  if (rule.imagenet_output) {
    const mass = clamp(petMass(outputs[rule.imagenet_output], rule.pet_indices), 1e-7);
    evidence += (Math.log(mass) - Math.log1p(-mass)) * (w.imagenet || 0);
  }
  const p = sigmoid(evidence);
  return { p, fires: p > rule.max };
}

export function decide(bundle, outputs, image) {
  const probabilities = outputs.probabilities;
  const classes = bundle.classes;
  const index = classes.length === 2 ? Number(probabilities[1] > bundle.threshold)
    : probabilities.indexOf(Math.max(...probabilities));
  const result = { label: classes[index], confidence: probabilities[index], neither_probability: null, reason: null,
    probabilities: Object.fromEntries(classes.map((c, i) => [c, probabilities[i]])) };
  const rules = (bundle.neither && bundle.neither.rules) || [];
  for (const rule of rules) {
    if (rule.kind === "blank") {
      if (flat(image, rule.max_std)) return { ...result, label: "neither", confidence: 1, neither_probability: 1,
        reason: "The photo is blank (one flat colour)." };
      continue;
    }
    const { p, fires } = ruleScore(rule, outputs);
    if (fires) return { ...result, label: "neither", confidence: p, neither_probability: p };
    result.neither_probability = result.neither_probability == null ? p : Math.max(result.neither_probability, p);
  }
  if (result.neither_probability != null) result.confidence *= 1 - result.neither_probability;
  return result;
}

function mirrored(image, size) {
  const out = new Uint8Array(image.length);
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      for (let c = 0; c < 3; c++) out[(y * size + x) * 3 + c] = image[(y * size + size - 1 - x) * 3 + c];
    }
  }
  return out;
}

export async function loadLocalModel(fetcher) {
  const ort = await import("./ort/ort.wasm.min.mjs");
  ort.env.wasm.wasmPaths = new URL("ort/", import.meta.url).href;
  // Threads need the page cross-origin isolated (the server's COOP/COEP headers); one otherwise.
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  const bundle = await (await fetcher("v1/bundle/bundle.json")).json();
  const graph = await (await fetcher("v1/bundle/graph")).arrayBuffer();
  const session = await ort.InferenceSession.create(new Uint8Array(graph), { executionProviders: ["wasm"] });
  const size = bundle.input.image_size;
  const rules = (bundle.neither && bundle.neither.rules) || [];
  const names = [...new Set(["probabilities", ...rules.flatMap((r) => [r.kind === "blank" ? null
    : r.output || (r.kind === "learned" ? "neither_probability" : null), r.imagenet_output]
    .concat(r.kind === "imagenet" ? ["imagenet_probabilities"] : []))].filter(Boolean))];

  async function run(image) {
    const views = bundle.tta ? [image, mirrored(image, size)] : [image];
    const sums = {};
    for (const view of views) {
      const tensor = new ort.Tensor("uint8", view, [1, size, size, 3]);
      const outputs = await session.run({ [bundle.graph.input]: tensor }, names);
      for (const name of names) {
        const data = Float64Array.from(outputs[name].data);
        sums[name] = sums[name] ? sums[name].map((value, i) => value + data[i]) : data;
      }
    }
    return Object.fromEntries(names.map((name) => [name, Array.from(sums[name], (v) => v / views.length)]));
  }

  async function label(file) {
    let image;
    try {
      image = await preprocess(file, size);
    } catch {
      return { error: { status: 415, message: `${file.name}: this browser cannot read it (try without local mode)` } };
    }
    return decide(bundle, await run(image), image);
  }
  return { label, preprocess: (blob) => preprocess(blob, size), run, bundle, threads: ort.env.wasm.numThreads };
}
