// Bundles the todo page (demo/page.ts and the client) into the one ES module dcrf-demo serves
// at /todo-page.js, checked in as crates/dcrf-demo/static/todo-page.js.
//   node scripts/build-page.mjs          writes the bundle
//   node scripts/build-page.mjs --check  fails if the checked-in bundle differs from its sources
import { readFile, writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

const root = fileURLToPath(new URL('..', import.meta.url));
const outfile = fileURLToPath(new URL('../../../crates/dcrf-demo/static/todo-page.js', import.meta.url));

const result = await esbuild.build({
  absWorkingDir: root,
  entryPoints: ['demo/page.ts'],
  bundle: true,
  format: 'esm',
  target: 'es2020',
  minify: true,
  legalComments: 'none',
  charset: 'utf8',
  write: false,
  logLevel: 'warning',
});
const banner = '// Built from clients/typescript (demo/page.ts and src/) by `npm run build:page`; do not edit.\n';
const bundle = banner + result.outputFiles[0].text;

if (process.argv.includes('--check')) {
  const current = await readFile(outfile, 'utf8').catch(() => '');
  if (current !== bundle) {
    console.error(
      `${outfile} does not match its sources: run \`npm run build:page\` in clients/typescript and commit it`,
    );
    process.exit(1);
  }
  console.log(`todo-page.js matches its sources (${bundle.length} bytes)`);
} else {
  await writeFile(outfile, bundle);
  console.log(`wrote ${outfile} (${bundle.length} bytes)`);
}
