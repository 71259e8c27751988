// A bnservice client in Node.js, written from proto/bnservice/v1/bnservice.proto
// alone: health check, create a BatchNorm2d, a unary forward, a streamed
// forward of a tensor over grpc-js's 4 MiB receive limit, list the modules.
//
//   npm install
//   node client.js [HOST:PORT] [MODULE_NAME]     (default 127.0.0.1:50051 node.bn)
//
// Each step prints one JSON line. With --auth-file on the server, set
// BNSERVICE_TOKEN to the tenant's token.
'use strict';

const crypto = require('node:crypto');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO =
  process.env.BNSERVICE_PROTO ||
  path.join(__dirname, '..', '..', 'proto', 'bnservice', 'v1', 'bnservice.proto');
const HEALTH_PROTO = path.join(__dirname, 'health.proto');
const ADDRESS = process.argv[2] || '127.0.0.1:50051';
const NAME = process.argv[3] || 'node.bn';
const C = 3;
// Tensors larger than this travel as streams (the Python SDK's threshold).
const STREAM_THRESHOLD = 1 << 20;
const CHUNK_BYTES = 1 << 20;

// keepCase: the .proto's field names; longs as numbers (int64 shapes); enums as names.
const LOAD_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true };
const bnservice = grpc.loadPackageDefinition(protoLoader.loadSync(PROTO, LOAD_OPTIONS)).bnservice.v1;
const health = grpc.loadPackageDefinition(protoLoader.loadSync(HEALTH_PROTO, LOAD_OPTIONS)).grpc
  .health.v1;

const credentials = grpc.credentials.createInsecure();
const client = new bnservice.BatchNormService(ADDRESS, credentials);
const healthClient = new health.Health(ADDRESS, credentials);

function metadata() {
  const md = new grpc.Metadata();
  if (process.env.BNSERVICE_TOKEN) md.set('authorization', `Bearer ${process.env.BNSERVICE_TOKEN}`);
  return md;
}

function deadline(seconds = 30) {
  return { deadline: new Date(Date.now() + seconds * 1000) };
}

function unary(stub, method, request) {
  return new Promise((resolve, reject) => {
    stub[method](request, metadata(), deadline(), (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

// float32 values -> Tensor bytes: explicitly little-endian, whatever this host is.
function encode(values, shape) {
  const data = Buffer.alloc(values.length * 4);
  for (let i = 0; i < values.length; i++) data.writeFloatLE(values[i], i * 4);
  return { dtype: 'float32', shape, data };
}

function decode(tensor) {
  if (tensor.dtype !== 'float32') throw new Error(`expected float32, got ${tensor.dtype}`);
  const out = new Float32Array(tensor.data.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = tensor.data.readFloatLE(i * 4);
  return out;
}

// The example's input: value i is ((i * 37) % 101) / 10, as float32 (tests rebuild it).
function input(shape) {
  const n = shape.reduce((a, b) => a * b, 1);
  const values = new Float32Array(n);
  for (let i = 0; i < n; i++) values[i] = ((i * 37) % 101) / 10;
  return values;
}

// Per-channel mean and standard deviation of an (N, C, ...) array.
function channelStats(values, shape) {
  const c = shape[1];
  const inner = shape.slice(2).reduce((a, b) => a * b, 1);
  const sum = new Float64Array(c);
  const sq = new Float64Array(c);
  for (let i = 0; i < values.length; i++) {
    const ch = Math.floor(i / inner) % c;
    sum[ch] += values[i];
    sq[ch] += values[i] * values[i];
  }
  const count = values.length / c;
  const mean = Array.from(sum, (s) => s / count);
  const std = Array.from(sq, (s, ch) => Math.sqrt(s / count - mean[ch] * mean[ch]));
  return { mean, std };
}

async function forward(ref, values, shape) {
  const request = { ref, request_id: crypto.randomUUID().replace(/-/g, '') };
  if (values.length * 4 <= STREAM_THRESHOLD) {
    const reply = await unary(client, 'Forward', { ...request, input: encode(values, shape) });
    return { output: decode(reply.output), shape: reply.output.shape, streamed: false };
  }
  // Stream: a header (dtype and shape, no data), then ~1 MiB slices of the bytes.
  // The reply comes back the same way: a header, then slices.
  const bytes = encode(values, shape).data;
  return new Promise((resolve, reject) => {
    const call = client.StreamForward(metadata(), deadline(120));
    let header = null;
    const parts = [];
    call.on('data', (chunk) => {
      if (chunk.header) header = chunk.header;
      if (chunk.data && chunk.data.length) parts.push(chunk.data);
    });
    call.on('error', reject);
    call.on('end', () => {
      if (!header) return reject(new Error('reply stream had no header'));
      const output = { ...header.output, data: Buffer.concat(parts) };
      resolve({ output: decode(output), shape: output.shape, streamed: true });
    });
    call.write({ header: { ...request, input: { dtype: 'float32', shape } } });
    for (let at = 0; at < bytes.length; at += CHUNK_BYTES) {
      call.write({ data: bytes.subarray(at, at + CHUNK_BYTES) });
    }
    call.end();
  });
}

async function main() {
  const status = await unary(healthClient, 'Check', { service: '' });
  console.log(JSON.stringify({ step: 'health', status: status.status }));

  // The server fills in no default: send every field of the config.
  const ref = { name: NAME, rank: 0 };
  const config = {
    kind: 'MODULE_KIND_BATCH_NORM_2D',
    num_features: C,
    eps: 1e-5,
    momentum: 0.9,
    affine: true,
    track_running_stats: true,
    freeze: false,
  };
  const info = await unary(client, 'CreateModule', { ref, config });
  console.log(JSON.stringify({ step: 'create', name: info.ref.name, training: info.training }));

  const small = [4, C, 2, 2];
  const y = await forward(ref, input(small), small);
  console.log(
    JSON.stringify({ step: 'forward', streamed: y.streamed, shape: y.shape, head: Array.from(y.output.slice(0, 8)) })
  );

  const large = [2, C, 512, 512]; // 6 MiB: over grpc-js's 4 MiB default receive limit
  const big = await forward(ref, input(large), large);
  const stats = channelStats(big.output, big.shape);
  console.log(JSON.stringify({ step: 'stream_forward', streamed: big.streamed, shape: big.shape, ...stats }));

  const listed = await unary(client, 'ListModules', {});
  console.log(JSON.stringify({ step: 'list', names: listed.modules.map((m) => m.ref.name) }));
}

main()
  .catch((err) => {
    console.error(`bnservice example failed: ${err.code !== undefined ? `code ${err.code}: ` : ''}${err.details || err.message}`);
    process.exitCode = 1;
  })
  .finally(() => {
    client.close();
    healthClient.close();
  });
