#!/usr/bin/env node
// Submit one job to mqtt-connector from Node.js (amqplib), wait for its reply, print it, and
// exit with the job's exit-code.
//
//   node examples/node/submit.js --topic a/b --content hi
//   node examples/node/submit.js --connector local --topic a/b --content hi \
//       --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f --queue mqtt-connector.send
//
// A command that answers: --response-topic makes the job a `request`; the worker publishes it,
// waits for the device's answer on that topic and returns it under `response`, which this
// script also writes on stderr (`answer on TOPIC: ...`). With MQTT 3.1.1 the device learns the
// topic from the content; with --mqtt-version 5 also from the Response Topic property.
//
//   node examples/node/submit.js --topic meters/42/read --content '{"reply": "meters/42/answer"}' \
//       --response-topic meters/42/answer
//
// The AMQP URL and the queue default to $MQTT_CONNECTOR_AMQP_URL and $MQTT_CONNECTOR_QUEUE, as
// for the worker; the topic and the content to $MQTT_TOPIC and $MQTT_CONTENT. Needs amqplib
// (`npm ci` in examples/node). The job goes out on a confirm channel with `mandatory`, so a
// queue nobody declared is an error here rather than a silent loss; the reply comes back on an
// exclusive queue of this connection, matched by its correlation id.
'use strict';

const { randomUUID } = require('node:crypto');
const { parseArgs } = require('node:util');
const amqp = require('amqplib');

function options() {
  const env = process.env;
  const { values } = parseArgs({
    options: {
      'amqp-url': { type: 'string', default: env.MQTT_CONNECTOR_AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f' },
      queue: { type: 'string', default: env.MQTT_CONNECTOR_QUEUE || 'mqtt-connector.send' },
      connector: { type: 'string', default: 'local' },
      topic: { type: 'string', default: env.MQTT_TOPIC },
      content: { type: 'string', default: env.MQTT_CONTENT || 'hello from Node.js' },
      'response-topic': { type: 'string' },
      'mqtt-version': { type: 'string' },
      timeout: { type: 'string' },
      wait: { type: 'string', default: '60' },
    },
  });
  if (!values.topic) {
    console.error('give a topic: --topic a/b (or MQTT_TOPIC=a/b)');
    process.exit(2);
  }
  return values;
}

// A request's answer, on stderr: the text, or the bytes when it was not UTF-8.
function showAnswer(reply) {
  const response = reply.response;
  if (!response) return;
  const content = response['content-encoding'] === 'base64'
    ? `bytes ${Buffer.from(response.content, 'base64').toString('hex')}`
    : JSON.stringify(response.content);
  console.error(`answer on ${response.topic}: ${content}`);
  for (const [name, value] of response['user-properties'] || []) {
    console.error(`  ${name}: ${value}`);
  }
}

async function main() {
  const args = options();
  const waitSeconds = Number(args.wait);
  // A cluster's URL list (comma-separated) is for the worker; a client needs one node.
  const url = args['amqp-url'].split(',')[0];
  const job = { connector: args.connector, topic: args.topic, content: args.content };
  if (args['response-topic']) {
    Object.assign(job, { action: 'request', 'response-topic': args['response-topic'] });
  }
  if (args['mqtt-version']) job['mqtt-version'] = args['mqtt-version'];
  if (args.timeout) job.timeout = Number(args.timeout);

  const connection = await amqp.connect(url);
  try {
    const channel = await connection.createConfirmChannel();
    const { queue: replyQueue } = await channel.assertQueue('', { exclusive: true });
    const correlationId = randomUUID();
    let timer;
    const reply = new Promise((resolve) => {
      timer = setTimeout(() => resolve(null), waitSeconds * 1000);
      channel.consume(replyQueue, (message) => {
        if (message && message.properties.correlationId === correlationId) {
          resolve(message.content.toString());
        }
      }, { noAck: true });
    });
    // RabbitMQ returns an unroutable mandatory message before it confirms it.
    let returned = false;
    channel.on('return', () => { returned = true; });
    channel.publish('', args.queue, Buffer.from(JSON.stringify(job)), {
      replyTo: replyQueue,
      correlationId,
      contentType: 'application/json',
      persistent: true,
      mandatory: true,
    });
    await channel.waitForConfirms();
    if (returned) {
      clearTimeout(timer);
      console.error(`no queue '${args.queue}': start a worker first (it declares the queue)`);
      return 1;
    }
    const body = await reply;
    clearTimeout(timer);
    if (body === null) {
      console.log(JSON.stringify({ 'exit-code': 6, message: `no reply within ${waitSeconds} s` }));
      return 6;
    }
    const parsed = JSON.parse(body);
    showAnswer(parsed);
    console.log(body);
    return parsed['exit-code'];
  } finally {
    await connection.close();
  }
}

main().then(
  (code) => { process.exitCode = code; },
  (err) => { console.error(`submit failed: ${err.message}`); process.exitCode = 1; },
);
