import type { TemplateView } from '../../engine/flows/templates.js';
import { optionalName, required, text } from './args.js';
import { type Rpc, unary } from './rpc.js';
import { refuseVolumes, sizesOf, type VmConfig } from './vm-config.js';

/**
 * User templates: an image with a size, booted once and snapshotted, so VMs made from it
 * restore instead of booting (CreateVmFromTemplate, or CreateVm naming it in image_ref).
 */

interface CreateTemplateRequest {
  name: string;
  image_ref: string;
  config: VmConfig | null;
}

function info(t: TemplateView): Record<string, unknown> {
  return {
    template_id: t.id,
    name: t.name,
    image_ref: t.image,
    status: t.status,
    vcpu: t.cpu,
    memory_bytes: String(t.memory_mb * 1024 ** 2),
  };
}

export const templateRpcs: Record<string, Rpc> = {
  CreateTemplate: unary(async (req: CreateTemplateRequest, cx) => {
    const name = optionalName(req.name);
    if (!name) required('', 'name');
    refuseVolumes(req.config, 'a template has no disks; attach them to its VMs (AttachDisk)');
    const s = sizesOf(cx, req.config);
    const t = await cx.act.createTemplate({
      name: name as string,
      image: req.image_ref === '' ? cx.app.defaultImage : text(req.image_ref, 'image_ref', 512),
      cpu: s.cpu,
      memoryMb: s.memoryMb,
      diskSizeGb: s.diskSizeGb,
    });
    return { template_id: t.id, name: t.name, status: t.status };
  }),
  ListTemplates: unary((_req: unknown, cx) => ({ templates: cx.act.listTemplates().map(info) })),
  DeleteTemplate: unary((req: { template_id: string }, cx) => {
    cx.act.deleteTemplate(required(req.template_id, 'template_id'));
    return {};
  }),
};
