"""The PyTorch transfer-learning tutorial's code path, standalone, as the benchmark's baseline.

A copy of https://pytorch.org/tutorials/beginner/transfer_learning_tutorial.html (ants vs bees):
same transforms, DataLoader (batch 4, shuffle, 4 workers), fp32 ResNet-18 with a new fc,
CrossEntropyLoss, SGD(lr=0.001, momentum=0.9), StepLR(7, 0.1) and the same `train_model`
(a train and a val phase per epoch, best weights by val accuracy). Deviations, each marked
`# bench:` below: command-line options, seeding, local weights instead of the ImageNet download,
timing and a JSON record, and no plotting/visualisation.

    python bench/tutorial.py --data-dir /tmp/tl-bench/hymenoptera_data --mode finetune \
        --weights ../shared/weights/resnet18-catsdogs-proxy.pth --epochs 25 --json out.json
"""

import argparse
import json
import os
import time
from tempfile import TemporaryDirectory

import torch
import torch.nn as nn
import torch.optim as optim
from torch.optim import lr_scheduler
from torchvision import datasets, models, transforms

# bench: options instead of the tutorial's hard-coded values.
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data-dir", default="data/hymenoptera_data")
parser.add_argument("--mode", choices=("finetune", "feature-extract"), default="finetune")
parser.add_argument("--epochs", type=int, default=25)
parser.add_argument("--weights", help="local torchvision-format resnet18 state dict "
                    "(default: download IMAGENET1K_V1, as the tutorial does)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--json", help="write best_val_acc and timings here")
args = parser.parse_args()

data_transforms = {
    'train': transforms.Compose([
        transforms.RandomResizedCrop(224),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    ]),
    'val': transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    ]),
}

data_dir = args.data_dir
image_datasets = {x: datasets.ImageFolder(os.path.join(data_dir, x),
                                          data_transforms[x])
                  for x in ['train', 'val']}
dataloaders = {x: torch.utils.data.DataLoader(image_datasets[x], batch_size=4,
                                             shuffle=True, num_workers=4)
               for x in ['train', 'val']}
dataset_sizes = {x: len(image_datasets[x]) for x in ['train', 'val']}
class_names = image_datasets['train'].classes

device = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else "cpu"
print(f"Using {device} device")

epoch_records = []  # bench: per-epoch timings and accuracy for --json


def train_model(model, criterion, optimizer, scheduler, num_epochs=25):
    since = time.time()

    # Create a temporary directory to save training checkpoints
    with TemporaryDirectory() as tempdir:
        best_model_params_path = os.path.join(tempdir, 'best_model_params.pt')

        torch.save(model.state_dict(), best_model_params_path)
        best_acc = 0.0

        for epoch in range(num_epochs):
            print(f'Epoch {epoch}/{num_epochs - 1}')
            print('-' * 10)
            record = {'epoch': epoch + 1}  # bench
            epoch_start = time.perf_counter()  # bench

            # Each epoch has a training and validation phase
            for phase in ['train', 'val']:
                phase_start = time.perf_counter()  # bench
                if phase == 'train':
                    model.train()  # Set model to training mode
                else:
                    model.eval()   # Set model to evaluate mode

                running_loss = 0.0
                running_corrects = 0

                # Iterate over data.
                for inputs, labels in dataloaders[phase]:
                    inputs = inputs.to(device)
                    labels = labels.to(device)

                    # zero the parameter gradients
                    optimizer.zero_grad()

                    # forward
                    # track history if only in train
                    with torch.set_grad_enabled(phase == 'train'):
                        outputs = model(inputs)
                        _, preds = torch.max(outputs, 1)
                        loss = criterion(outputs, labels)

                        # backward + optimize only if in training phase
                        if phase == 'train':
                            loss.backward()
                            optimizer.step()

                    # statistics
                    running_loss += loss.item() * inputs.size(0)
                    running_corrects += torch.sum(preds == labels.data)
                if phase == 'train':
                    scheduler.step()

                epoch_loss = running_loss / dataset_sizes[phase]
                epoch_acc = running_corrects.double() / dataset_sizes[phase]

                print(f'{phase} Loss: {epoch_loss:.4f} Acc: {epoch_acc:.4f}')
                # bench: same fields as tl's metrics.jsonl; train img/s over the train phase only
                record[f'{phase}_loss'], record[f'{phase}_acc'] = epoch_loss, epoch_acc.item()
                if phase == 'train':
                    record['train_images_per_s'] = dataset_sizes[phase] / (time.perf_counter() - phase_start)

                # deep copy the model
                if phase == 'val' and epoch_acc > best_acc:
                    best_acc = epoch_acc
                    torch.save(model.state_dict(), best_model_params_path)

            record['seconds'] = time.perf_counter() - epoch_start  # bench
            epoch_records.append(record)  # bench
            print()

        time_elapsed = time.time() - since
        print(f'Training complete in {time_elapsed // 60:.0f}m {time_elapsed % 60:.0f}s')
        print(f'Best val Acc: {best_acc:4f}')

        # load best model weights
        model.load_state_dict(torch.load(best_model_params_path, weights_only=True))
    return model, float(best_acc), time_elapsed  # bench: the tutorial returns only the model


def resnet18():
    """bench: the tutorial calls models.resnet18(weights='IMAGENET1K_V1'); offline we load the
    same architecture from a local state dict. Seeding right before construction makes the new
    fc's init follow the same RNG calls as tl's (set_seed, then build the model, load, new head);
    data order and augmentation draw from different streams on the two sides all the same, so
    the benchmark compares accuracy over several seeds."""
    torch.manual_seed(args.seed)
    if args.weights is None:
        return models.resnet18(weights='IMAGENET1K_V1')
    model = models.resnet18()
    model.load_state_dict(torch.load(args.weights, map_location='cpu', weights_only=True))
    return model


if args.mode == 'finetune':
    model_ft = resnet18()
    num_ftrs = model_ft.fc.in_features
    # bench: len(class_names) rather than the tutorial's literal 2 (the tutorial mentions this form)
    model_ft.fc = nn.Linear(num_ftrs, len(class_names))

    model_ft = model_ft.to(device)

    criterion = nn.CrossEntropyLoss()

    # Observe that all parameters are being optimized
    optimizer_ft = optim.SGD(model_ft.parameters(), lr=0.001, momentum=0.9)

    # Decay LR by a factor of 0.1 every 7 epochs
    exp_lr_scheduler = lr_scheduler.StepLR(optimizer_ft, step_size=7, gamma=0.1)

    model_ft, best_acc, seconds = train_model(model_ft, criterion, optimizer_ft, exp_lr_scheduler,
                                              num_epochs=args.epochs)
else:
    model_conv = resnet18()
    for param in model_conv.parameters():
        param.requires_grad = False

    # Parameters of newly constructed modules have requires_grad=True by default
    num_ftrs = model_conv.fc.in_features
    model_conv.fc = nn.Linear(num_ftrs, len(class_names))

    model_conv = model_conv.to(device)

    criterion = nn.CrossEntropyLoss()

    # Observe that only parameters of final layer are being optimized as
    # opposed to before.
    optimizer_conv = optim.SGD(model_conv.fc.parameters(), lr=0.001, momentum=0.9)

    # Decay LR by a factor of 0.1 every 7 epochs
    exp_lr_scheduler = lr_scheduler.StepLR(optimizer_conv, step_size=7, gamma=0.1)

    model_conv, best_acc, seconds = train_model(model_conv, criterion, optimizer_conv,
                                                exp_lr_scheduler, num_epochs=args.epochs)

if args.json:  # bench: the record bench.py reads
    with open(args.json, 'w') as f:
        json.dump({'best_val_acc': best_acc, 'total_seconds': seconds, 'epochs': epoch_records,
                   'num_train': dataset_sizes['train'], 'num_val': dataset_sizes['val'],
                   'classes': class_names}, f, indent=2)
