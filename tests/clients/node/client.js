#!/usr/bin/env node
// A caller written by others: a Node.js service loads our proto files at runtime with
// @grpc/proto-loader (no generated code) and calls every service with @grpc/grpc-js.
// Prints one JSON object with what it saw; tests/node_client.rs checks it.
//
// Usage: node client.js HOST:PORT IMAGE_FILE [--tls-ca CA_PEM] [--token TOKEN]
// With --tls-ca the channel is TLS (verified against that CA); with --token every call carries it
// as a bearer token, and a call without it is tried too and its status recorded.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const ROOT = path.resolve(__dirname, '..', '..', '..');

function loadPackage() {
  const definition = protoLoader.loadSync('caption/v1/caption.proto', {
    // proto/ holds ours and the vendored google/rpc/status.proto; status.proto imports
    // google/protobuf/any.proto, which protobufjs bundles (its own google/ folder, and built-ins).
    includeDirs: [path.join(ROOT, 'proto'), path.dirname(require.resolve('protobufjs/package.json'))],
    keepCase: true, // field names as in the .proto (top_k, num_candidates)
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).caption.v1;
}

function parseArgs(argv) {
  const args = { positional: [] };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--tls-ca') args.tlsCa = argv[++i];
    else if (argv[i] === '--token') args.token = argv[++i];
    else args.positional.push(argv[i]);
  }
  if (args.positional.length !== 2) {
    console.error('usage: client.js HOST:PORT IMAGE_FILE [--tls-ca CA_PEM] [--token TOKEN]');
    process.exit(2);
  }
  [args.addr, args.image] = args.positional;
  return args;
}

// A unary call as a promise: resolves with the response, or with {code, details} on failure.
function call(client, method, request, deadlineSeconds = 60) {
  return new Promise((resolve) => {
    const deadline = new Date(Date.now() + deadlineSeconds * 1000);
    client[method](request, { deadline }, (err, response) => {
      if (err) resolve({ error: { code: grpc.status[err.code], details: err.details } });
      else resolve({ response });
    });
  });
}

function ok(result, what) {
  if (result.error) throw new Error(`${what} failed: ${result.error.code}: ${result.error.details}`);
  return result.response;
}

// CaptionStream with a good and a bad image: both answered, the bad one with a google.rpc.Status.
function stream(cascade, image) {
  return new Promise((resolve, reject) => {
    const answers = {};
    const s = cascade.CaptionStream({ deadline: new Date(Date.now() + 60000) });
    s.on('data', (r) => {
      answers[r.id] = r.result === 'error' ? { error: { code: r.error.code, message: r.error.message } } : {
        captions: r.response.captions.map((c) => c.text),
      };
    });
    s.on('error', reject);
    s.on('end', () => resolve(answers));
    s.write({ id: 'good', request: { image: { data: image }, top_k: 1 } });
    s.write({ id: 'bad', request: { image: { data: Buffer.from('not an image') } } });
    s.end();
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const pb = loadPackage();
  const seen = {};
  let creds;
  if (args.tlsCa) {
    const tls = grpc.credentials.createSsl(fs.readFileSync(args.tlsCa));
    if (args.token) {
      const bare = new pb.Cascade(args.addr, tls);
      seen.no_token = (await call(bare, 'Caption', { image: { data: Buffer.from('x') } })).error || { code: 'OK' };
      bare.close();
      const bearer = grpc.credentials.createFromMetadataGenerator((_params, cb) => {
        const md = new grpc.Metadata();
        md.add('authorization', `Bearer ${args.token}`);
        cb(null, md);
      });
      creds = grpc.credentials.combineChannelCredentials(tls, bearer);
    } else {
      creds = tls;
    }
  } else {
    creds = grpc.credentials.createInsecure();
  }
  const cascade = new pb.Cascade(args.addr, creds);
  const generator = new pb.Generator(args.addr, creds);
  const ranker = new pb.Ranker(args.addr, creds);
  const image = fs.readFileSync(args.image);

  const caption = ok(
    await call(cascade, 'Caption', {
      image: { data: image },
      params: { seed: 1, decoding: 'DECODING_GREEDY' },
      top_k: 3,
    }),
    'Caption',
  );
  seen.caption = caption.captions.map((c) => ({ text: c.text, probability: c.probability, count: c.count }));
  seen.key = caption.key;
  seen.caption_candidates = caption.candidates.length;

  const generated = ok(
    await call(generator, 'Generate', { image: { data: image }, params: { num_candidates: 4, seed: 2 } }),
    'Generate',
  );
  seen.candidates = generated.candidates.map((c) => c.text);
  seen.token_ids = generated.candidates.map((c) => c.token_ids.length);

  const ranked = ok(
    await call(ranker, 'Rank', {
      image: { data: image },
      captions: [seen.caption[0].text, 'a small red square on a black background'],
    }),
    'Rank',
  );
  seen.rank = ranked.captions.map((c) => ({ text: c.text, probability: c.probability, index: c.index }));

  seen.bad_image = (await call(cascade, 'Caption', { image: { data: Buffer.from('not an image') } })).error;
  seen.bad_param = (await call(generator, 'Generate', { image: { data: image }, params: { top_p: 2.0 } })).error;
  seen.stream = await stream(cascade, image);

  for (const c of [cascade, generator, ranker]) c.close();
  process.stdout.write(JSON.stringify(seen) + '\n');
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
