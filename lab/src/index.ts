/**
 * The ipyparallel_lite cluster panel for JupyterLab 4 and Notebook 7.
 *
 * A left-sidebar panel lists the clusters the server extension knows (started here,
 * from notebooks or from the shell) with New / Start / Stop / Scale, and for each
 * running cluster its engines (state, host, pid, tasks queued/running/done), task
 * totals and rate, and its recent tasks (label, state, engine, duration), polled
 * once a second while the panel is visible. Two palette
 * commands insert the client connection code and a %%px cell into the active
 * notebook. State lives in the clusters; the page only shows what the server says.
 */

import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { INotebookTracker, NotebookActions } from '@jupyterlab/notebook';
import { ServerConnection } from '@jupyterlab/services';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

const PLUGIN_ID = 'ipyparallel-lite:panel';
const API = 'ipyparallel-lite';
const POLL_MS = 1000;
/** How many of a cluster's recent tasks the live view lists. */
const RECENT_TASKS = 20;

const CommandIds = {
  insertClient: 'ipyparallel-lite:insert-client',
  insertPx: 'ipyparallel-lite:insert-px',
  showPanel: 'ipyparallel-lite:show-panel'
};

const clusterIcon = new LabIcon({
  name: 'ipyparallel-lite:clusters',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><g class="jp-icon3" fill="#616161">' +
    '<rect x="3" y="3" width="8" height="8" rx="1"/><rect x="13" y="3" width="8" height="8" rx="1"/>' +
    '<rect x="3" y="13" width="8" height="8" rx="1"/><rect x="13" y="13" width="8" height="8" rx="1"/>' +
    '</g></svg>'
});

/** A cluster as the server describes it. */
interface IClusterModel {
  id: string;
  profile: string;
  cluster_id: string;
  state: 'stopped' | 'starting' | 'running' | 'stopping' | 'scaling';
  n: number;
  engines: number;
  controller_pid: number | null;
  created_here: boolean;
  error: string | null;
}

interface IEngine {
  id: number;
  state: 'idle' | 'busy';
  host: string | null;
  pid: number | null;
  queued: number;
  running: number;
  done: number;
}

interface IEnginesView {
  engines: IEngine[];
  totals: { engines: number; queued: number; running: number; done: number };
}

interface ITask {
  msg_id: string;
  label: string | null;
  state: 'pending' | 'running' | 'done' | 'error' | 'aborted' | 'lost';
  error: string | null;
  engine: number | null;
  submitted: string | null;
  started: string | null;
  completed: string | null;
  duration: number | null;
}

/** Calls the server extension; failures raise an Error with the server's reason. */
async function requestAPI<T>(
  path: string[],
  init: RequestInit = {},
  query = ''
): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url =
    URLExt.join(settings.baseUrl, API, ...path.map(p => encodeURIComponent(p))) + query;
  const response = await ServerConnection.makeRequest(url, init, settings);
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) {
    throw new Error((data && data.message) || response.statusText);
  }
  return data as T;
}

function post<T>(path: string[], body: object = {}): Promise<T> {
  return requestAPI<T>(path, { method: 'POST', body: JSON.stringify(body) });
}

function element<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className: string,
  text = ''
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = className;
  if (text) {
    node.textContent = text;
  }
  return node;
}

function numberInput(value: number, label: string): HTMLInputElement {
  const input = element('input', 'ipp-lite-n');
  input.type = 'number';
  input.min = '0';
  input.value = String(value);
  input.title = label;
  input.setAttribute('aria-label', label);
  return input;
}

/** ``seconds`` as the task list shows a duration: 0.12 s, 3.4 s, 2 min 5 s. */
function formatDuration(seconds: number | null): string {
  if (seconds === null) {
    return '…';
  }
  if (seconds < 1) {
    return `${seconds.toFixed(2)} s`;
  }
  if (seconds < 60) {
    return `${seconds.toFixed(1)} s`;
  }
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

/** A compact table; ``rows`` give each row's class and cells (null shows as '?'). */
function table(
  className: string,
  headers: string[],
  rows: {
    className: string;
    data: Record<string, string>;
    title?: string;
    cells: (string | number | null)[];
  }[]
): HTMLElement {
  const node = element('table', className);
  const head = node.createTHead().insertRow();
  for (const label of headers) {
    head.append(element('th', '', label));
  }
  const body = node.createTBody();
  for (const r of rows) {
    const row = body.insertRow();
    row.className = r.className;
    Object.assign(row.dataset, r.data);
    for (const value of r.cells) {
      const cell = row.insertCell();
      cell.textContent = value === null ? '?' : String(value);
      cell.title = r.title ?? cell.textContent;
    }
  }
  const scroller = element('div', `ipp-lite-table-scroll ${className}-scroll`);
  scroller.append(node);
  return scroller;
}

/** Python that connects a notebook to ``cluster`` and activates %px. */
export function clientCode(cluster: IClusterModel | null): string {
  const args = cluster
    ? `profile=${JSON.stringify(cluster.profile)}, cluster_id=${JSON.stringify(cluster.cluster_id)}`
    : '';
  return [
    'import ipyparallel_lite as ipp',
    '',
    `rc = ipp.Client(${args})`,
    'rc.activate()  # %px and %%px now run on every engine',
    'rc.ids'
  ].join('\n');
}

const PX_CODE = ['%%px', 'import os', 'os.getpid()'].join('\n');

/** One cluster's card: its header, its controls, and (running) its engines. */
class ClusterCard {
  readonly node = element('div', 'ipp-lite-cluster');
  private readonly title = element('div', 'ipp-lite-cluster-title');
  private readonly status = element('div', 'ipp-lite-cluster-status');
  private readonly error = element('div', 'ipp-lite-error');
  private readonly nInput: HTMLInputElement;
  private readonly startButton = element('button', 'jp-mod-styled jp-mod-accept', 'Start');
  private readonly stopButton = element('button', 'jp-mod-styled jp-mod-warn', 'Stop');
  private readonly scaleButton = element('button', 'jp-mod-styled', 'Scale');
  private readonly codeButton = element('button', 'jp-mod-styled', 'Insert client code');
  private readonly live = element('div', 'ipp-lite-live');
  private lastDone: { done: number; time: number } | null = null;
  private nTouched = false;

  constructor(
    public model: IClusterModel,
    private readonly panel: ClusterPanel
  ) {
    this.node.dataset.id = model.id;
    this.nInput = numberInput(model.n, `engines of ${model.id}`);
    this.nInput.addEventListener('input', () => (this.nTouched = true));
    const controls = element('div', 'ipp-lite-controls');
    controls.append(
      this.nInput,
      this.startButton,
      this.scaleButton,
      this.stopButton,
      this.codeButton
    );
    this.node.append(this.title, this.status, controls, this.error, this.live);
    this.startButton.onclick = () =>
      this.act(post([...this.path, 'start'], { n: this.n() }));
    this.stopButton.onclick = () => this.act(post([...this.path, 'stop']));
    this.scaleButton.onclick = () =>
      this.act(post([...this.path, 'scale'], { n: this.n() }));
    this.codeButton.onclick = () =>
      void panel.app.commands.execute(CommandIds.insertClient, { cluster: model.id });
    this.render();
  }

  private get path(): string[] {
    return ['clusters', this.model.id];
  }

  private n(): number {
    return Number(this.nInput.value);
  }

  private async act(request: Promise<unknown>): Promise<void> {
    this.error.textContent = '';
    this.nTouched = false;
    this.status.textContent = 'working…';
    try {
      await request;
    } catch (e) {
      this.error.textContent = (e as Error).message;
    }
    await this.panel.refresh();
  }

  update(model: IClusterModel): void {
    this.model = model;
    if (!this.nTouched && document.activeElement !== this.nInput) {
      this.nInput.value = String(model.state === 'running' ? model.engines : model.n);
    }
    this.render();
  }

  private render(): void {
    const m = this.model;
    const name = m.cluster_id === '' ? "''" : m.cluster_id;
    this.title.textContent = `${name}  (profile ${m.profile})`;
    this.node.dataset.state = m.state;
    const where = m.created_here ? '' : ' · started outside the panel';
    this.status.textContent =
      m.state === 'running'
        ? `running · ${m.engines} engine${m.engines === 1 ? '' : 's'} · controller pid ${m.controller_pid}${where}`
        : m.state + where;
    if (m.error) {
      this.error.textContent = m.error;
    }
    const running = m.state === 'running';
    const busy = !['running', 'stopped'].includes(m.state);
    this.startButton.disabled = running || busy;
    this.stopButton.disabled = !running;
    this.scaleButton.disabled = !running;
    this.codeButton.disabled = !running;
    if (!running) {
      this.live.replaceChildren();
      this.lastDone = null;
    }
  }

  /** Fetch and show the engines and the recent tasks of a running cluster. */
  async poll(): Promise<void> {
    if (this.model.state !== 'running') {
      return;
    }
    let view: IEnginesView;
    let tasks: ITask[];
    try {
      [view, { tasks }] = await Promise.all([
        requestAPI<IEnginesView>([...this.path, 'engines']),
        requestAPI<{ tasks: ITask[] }>([...this.path, 'tasks'], {}, `?limit=${RECENT_TASKS}`)
      ]);
    } catch {
      return; // stopped meanwhile: the next refresh says so
    }
    const now = performance.now();
    const t = view.totals;
    let rate = '';
    if (this.lastDone && now > this.lastDone.time) {
      const perSecond = ((t.done - this.lastDone.done) * 1000) / (now - this.lastDone.time);
      rate = ` · ${perSecond.toFixed(1)} tasks/s`;
    }
    this.lastDone = { done: t.done, time: now };
    const totals = element(
      'div',
      'ipp-lite-totals',
      `tasks: ${t.done} done · ${t.running} running · ${t.queued} queued${rate}`
    );
    const engines = table(
      'ipp-lite-engines',
      ['id', 'state', 'host', 'pid', 'queued', 'running', 'done'],
      view.engines.map(e => ({
        className: `ipp-lite-engine ipp-lite-${e.state}`,
        data: { engine: String(e.id) },
        cells: [e.id, e.state, e.host, e.pid, e.queued, e.running, e.done]
      }))
    );
    const heading = element('div', 'ipp-lite-tasks-title', 'recent tasks');
    let recent: HTMLElement;
    if (tasks.length === 0) {
      recent = element('div', 'ipp-lite-tasks-empty', 'none recorded yet');
    } else {
      recent = table(
        'ipp-lite-tasks',
        ['label', 'state', 'engine', 'duration'],
        tasks.map(t => ({
          className: `ipp-lite-task ipp-lite-task-${t.state}`,
          data: { msgId: t.msg_id, state: t.state },
          title: `${t.label ?? 'no label'} · ${t.msg_id} · submitted ${t.submitted}`,
          cells: [
            t.label ?? '',
            t.error && t.state === 'error' ? `error: ${t.error}` : t.state,
            t.engine ?? '',
            formatDuration(t.duration)
          ]
        }))
      );
    }
    this.live.replaceChildren(totals, engines, heading, recent);
  }
}

/** The sidebar panel: a form for new clusters and one card per cluster. */
class ClusterPanel extends Widget {
  private readonly list = element('div', 'ipp-lite-clusters');
  private readonly message = element('div', 'ipp-lite-error');
  private readonly cards = new Map<string, ClusterCard>();
  private timer = 0;
  private refreshing: Promise<void> | null = null;

  constructor(readonly app: JupyterFrontEnd) {
    super();
    this.id = 'ipyparallel-lite-panel';
    this.addClass('ipp-lite-panel');
    this.title.icon = clusterIcon;
    this.title.caption = 'Parallel clusters';
    const header = element('div', 'ipp-lite-header', 'Clusters');
    const form = element('div', 'ipp-lite-new');
    const profile = element('input', 'ipp-lite-profile');
    profile.value = 'default';
    profile.title = 'profile';
    profile.setAttribute('aria-label', 'profile of the new cluster');
    const n = numberInput(2, 'engines of the new cluster');
    const create = element('button', 'jp-mod-styled jp-mod-accept', 'New cluster');
    create.onclick = async () => {
      this.message.textContent = '';
      try {
        await post(['clusters'], { profile: profile.value, n: Number(n.value) });
      } catch (e) {
        this.message.textContent = (e as Error).message;
      }
      await this.refresh();
    };
    form.append(profile, n, create);
    this.node.append(header, form, this.message, this.list);
  }

  /** The running cluster code should connect to: the one named, else the first. */
  target(id?: string): IClusterModel | null {
    const models = [...this.cards.values()].map(c => c.model);
    return (
      models.find(m => m.id === id) ??
      models.find(m => m.state === 'running') ??
      null
    );
  }

  refresh(): Promise<void> {
    // one refresh at a time: a slow server must not pile requests up
    this.refreshing ??= this.doRefresh().finally(() => (this.refreshing = null));
    return this.refreshing;
  }

  private async doRefresh(): Promise<void> {
    let models: IClusterModel[];
    try {
      models = (await requestAPI<{ clusters: IClusterModel[] }>(['clusters'])).clusters;
    } catch (e) {
      this.message.textContent = `cannot reach the cluster service: ${(e as Error).message}`;
      return;
    }
    const seen = new Set<string>();
    for (const model of models) {
      seen.add(model.id);
      let card = this.cards.get(model.id);
      if (card) {
        card.update(model);
      } else {
        card = new ClusterCard(model, this);
        this.cards.set(model.id, card);
        this.list.append(card.node);
      }
    }
    for (const [id, card] of this.cards) {
      if (!seen.has(id)) {
        card.node.remove();
        this.cards.delete(id);
      }
    }
    if (models.length === 0) {
      this.list.replaceChildren(
        element('div', 'ipp-lite-empty', 'No clusters yet: create one above, or start one with ipcluster-lite.')
      );
    } else {
      this.list.querySelector('.ipp-lite-empty')?.remove();
    }
    await Promise.all([...this.cards.values()].map(card => card.poll()));
  }

  protected onAfterShow(): void {
    void this.refresh();
    this.timer = window.setInterval(() => {
      if (this.isVisible) {
        void this.refresh();
      }
    }, POLL_MS);
  }

  protected onAfterHide(): void {
    window.clearInterval(this.timer);
  }
}

function insertCell(tracker: INotebookTracker | null, code: string): void {
  const notebook = tracker?.currentWidget;
  if (!notebook) {
    return;
  }
  NotebookActions.insertBelow(notebook.content);
  const cell = notebook.content.activeCell;
  if (cell) {
    cell.model.sharedModel.setSource(code);
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Clusters of ipyparallel_lite: start, stop, scale, and their engines at work',
  autoStart: true,
  // both optional: Notebook 7's file browser page has no notebooks, and no palette
  optional: [INotebookTracker, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker | null,
    palette: ICommandPalette | null
  ) => {
    const panel = new ClusterPanel(app);
    app.shell.add(panel, 'left', { rank: 700 });

    const hasNotebook = () => !!tracker?.currentWidget;
    app.commands.addCommand(CommandIds.insertClient, {
      label: 'Parallel: insert client connection code',
      caption: 'Insert a cell that connects to a running cluster and activates %px',
      isEnabled: hasNotebook,
      execute: args => insertCell(tracker, clientCode(panel.target(args.cluster as string | undefined)))
    });
    app.commands.addCommand(CommandIds.insertPx, {
      label: 'Parallel: insert a %%px cell',
      caption: 'Insert a cell that runs on every engine',
      isEnabled: hasNotebook,
      execute: () => insertCell(tracker, PX_CODE)
    });
    app.commands.addCommand(CommandIds.showPanel, {
      label: 'Parallel: show the clusters panel',
      execute: () => app.shell.activateById(panel.id)
    });
    if (palette) {
      for (const command of Object.values(CommandIds)) {
        palette.addItem({ command, category: 'Parallel' });
      }
    }
  }
};

export default plugin;
