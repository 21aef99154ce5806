/**
 * The live todo page `dcrf-demo` serves at `/`: every todo, kept live by a `subscribe_list`
 * on the `todos` stream of the same host's `/ws`, with add, toggle, rename, delete and
 * "mark all done". Bundled into `crates/dcrf-demo/static/todo-page.js` by
 * `npm run build:page`.
 *
 * @module
 */

import { type Client, type LiveList, RequestError, type Stream, connect } from '../src/index.js';
import type { BulkSetDone, Todo, TodoInput, Updated } from './types.js';

/** The element with this id, which the page's markup provides. */
function byId<E extends HTMLElement>(id: string): E {
  const element = document.getElementById(id);
  if (!element) throw new Error(`the page has no #${id}`);
  return element as E;
}

/** A readable message for a failed request. */
function describe(error: unknown): string {
  if (error instanceof RequestError) {
    const first = error.errors[0];
    if (typeof first === 'string') return first;
    if (first && typeof first === 'object') {
      return Object.entries(first as Record<string, unknown>)
        .map(([field, messages]) => `${field}: ${Array.isArray(messages) ? messages.join(' ') : String(messages)}`)
        .join('; ');
    }
    return `error ${error.response_status}`;
  }
  return error instanceof Error ? error.message : String(error);
}

/** The page: its elements, the connection and the live list. */
class TodoPage {
  private readonly client: Client;
  private readonly todos: Stream<Todo, TodoInput>;
  private list: LiveList<Todo> | null = null;
  private readonly rows = new Map<number, HTMLLIElement>();
  private editing: number | null = null;
  private readonly status = byId<HTMLElement>('connection-status');
  private readonly input = byId<HTMLInputElement>('new-todo');
  private readonly listElement = byId<HTMLUListElement>('todo-list');
  private readonly markAll = byId<HTMLButtonElement>('mark-all-done');
  private readonly count = byId<HTMLElement>('todo-count');
  private readonly errorElement = byId<HTMLElement>('error');
  private errorTimer: ReturnType<typeof setTimeout> | undefined;

  constructor() {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    this.client = connect(`${scheme}//${location.host}/ws`, {
      backoff: { minDelayMs: 200, maxDelayMs: 3000 },
    });
    this.todos = this.client.stream<Todo, TodoInput>('todos');
    this.client.onStateChange(() => this.showStatus());
    this.input.addEventListener('keydown', (event) => {
      if (event.key === 'Enter') {
        event.preventDefault();
        void this.add();
      }
    });
    this.markAll.addEventListener('click', () => void this.markAllDone());
    this.showStatus();
  }

  /** Subscribes to every todo, in id order. */
  async start(): Promise<void> {
    try {
      const list = await this.todos.subscribeList({ ordering: 'id' });
      this.list = list;
      list.onChange(() => this.render());
      list.onStatus(() => this.showStatus());
      this.render();
      this.showStatus();
    } catch (error) {
      this.showError(`could not subscribe: ${describe(error)}`);
      this.showStatus();
    }
  }

  private showStatus(): void {
    const listLive = this.list !== null && this.list.status === 'live';
    const state = this.client.state;
    const text = state === 'open' ? (listLive ? 'live' : 'syncing') : state === 'closed' ? 'offline' : state;
    this.status.textContent = text;
    this.status.dataset.state = text;
  }

  private showError(message: string): void {
    this.errorElement.textContent = message;
    clearTimeout(this.errorTimer);
    this.errorTimer = setTimeout(() => {
      this.errorElement.textContent = '';
    }, 5000);
  }

  /** Runs a write; its result arrives as a push, so only failures are shown here. */
  private async write(what: string, run: () => Promise<unknown>): Promise<boolean> {
    try {
      await run();
      return true;
    } catch (error) {
      this.showError(`${what}: ${describe(error)}`);
      this.render();
      return false;
    }
  }

  private async add(): Promise<void> {
    const title = this.input.value.trim();
    if (!title) return;
    const ok = await this.write('add', () => this.todos.create({ title }));
    if (ok && this.input.value.trim() === title) this.input.value = '';
  }

  private async markAllDone(): Promise<void> {
    const ids = (this.list?.items ?? []).filter((t) => !t.done).map((t) => t.id);
    if (ids.length === 0) return;
    const args: BulkSetDone = { ids, done: true };
    await this.write('mark all done', () => this.todos.request<Updated>('bulk_set_done', args));
  }

  private startEditing(todo: Todo, row: HTMLLIElement): void {
    if (this.editing !== null) return;
    this.editing = todo.id;
    const title = row.querySelector<HTMLElement>('.title');
    if (!title) return;
    const field = document.createElement('input');
    field.className = 'edit';
    field.value = todo.title;
    field.dataset.testid = 'todo-edit';
    field.setAttribute('aria-label', 'Rename');
    let finished = false;
    const finish = async (save: boolean) => {
      if (finished) return;
      finished = true;
      const value = field.value.trim();
      this.editing = null;
      field.remove();
      title.hidden = false;
      if (save && value && value !== todo.title) {
        await this.write('rename', () => this.todos.patch(todo.id, { title: value }));
      }
      this.render();
    };
    field.addEventListener('keydown', (event) => {
      if (event.key === 'Enter') void finish(true);
      else if (event.key === 'Escape') void finish(false);
    });
    field.addEventListener('blur', () => void finish(true));
    title.hidden = true;
    title.after(field);
    field.focus();
    field.select();
  }

  private makeRow(todo: Todo): HTMLLIElement {
    const row = document.createElement('li');
    row.dataset.testid = 'todo-item';
    const toggle = document.createElement('input');
    toggle.type = 'checkbox';
    toggle.dataset.testid = 'todo-toggle';
    toggle.setAttribute('aria-label', 'Done');
    const title = document.createElement('span');
    title.className = 'title';
    title.dataset.testid = 'todo-title';
    const rename = document.createElement('button');
    rename.className = 'rename';
    rename.dataset.testid = 'todo-rename';
    rename.setAttribute('aria-label', 'Rename');
    rename.title = 'Rename';
    const remove = document.createElement('button');
    remove.className = 'delete';
    remove.dataset.testid = 'todo-delete';
    remove.setAttribute('aria-label', 'Delete');
    remove.title = 'Delete';
    row.append(toggle, title, rename, remove);
    const current = () => this.list?.get(Number(row.dataset.id));
    toggle.addEventListener('change', () => {
      const t = current();
      if (t) void this.write('toggle', () => this.todos.patch(t.id, { done: toggle.checked }));
    });
    remove.addEventListener('click', () => {
      const t = current();
      if (t) void this.write('delete', () => this.todos.delete(t.id));
    });
    const edit = () => {
      const t = current();
      if (t) this.startEditing(t, row);
    };
    rename.addEventListener('click', edit);
    title.addEventListener('dblclick', edit);
    return row;
  }

  /** Brings the rows in line with the live list (keyed by id, in the list's order). */
  private render(): void {
    const items = this.list?.items ?? [];
    const seen = new Set<number>();
    let previous: HTMLLIElement | null = null;
    for (const todo of items) {
      seen.add(todo.id);
      let row = this.rows.get(todo.id);
      if (!row) {
        row = this.makeRow(todo);
        this.rows.set(todo.id, row);
      }
      row.dataset.id = String(todo.id);
      row.classList.toggle('done', todo.done);
      const toggle = row.querySelector<HTMLInputElement>('input[type=checkbox]');
      if (toggle) toggle.checked = todo.done;
      const title = row.querySelector<HTMLElement>('.title');
      if (title && title.textContent !== todo.title) title.textContent = todo.title;
      const expected: ChildNode | null = previous ? previous.nextSibling : this.listElement.firstChild;
      if (expected !== row) this.listElement.insertBefore(row, expected);
      previous = row;
    }
    for (const [id, row] of this.rows) {
      if (!seen.has(id) && id !== this.editing) {
        row.remove();
        this.rows.delete(id);
      }
    }
    const left = items.filter((t) => !t.done).length;
    this.count.textContent = `${left} of ${items.length} left`;
  }
}

void new TodoPage().start();
